"""Geometric merges of one tensor's experts, after mergekit's `model_stock`, `slerp` and `karcher`.

Model Stock (Jang et al., ECCV 2024) moves from the seed towards the experts' mean by how much their
modality vectors agree; SLERP interpolates two experts along the great circle between them; the
Karcher mean is the point on that sphere closest to all of them, for any number of experts.
"""

import torch
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import MergeError
from vlmerge.merging.registry import MergeInputs, register_method

NORM_FLOOR = 1e-6  # model_stock: floor of the product of two vectors' norms, as mergekit's
SINGULAR = 1e-6  # model_stock: |1 + (K-1) cos| below this keeps the seed, as mergekit's
DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly, as mergekit's
EPS = 1e-8  # slerp: a norm at most this is taken as 1 for the angle, as mergekit's
KARCHER_STEPS = 10  # karcher: mergekit's most Riemannian gradient steps
KARCHER_TOL = 1e-5  # karcher: mergekit's tolerance


# --------------------------------------------------------------------------- Model Stock
class ModelStockOptions(StrictConfig):
    filter_wise: bool = Field(False, description="one ratio per row (last axis) instead of per tensor")


@register_method("model_stock", ModelStockOptions, needs_origin=True)
def model_stock(inputs: MergeInputs, options: ModelStockOptions) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): t·mean(θₘ) + (1−t)·θ₀, t = K cos / (1 + (K−1) cos).

    cos is the mean over expert pairs of the cosine of their modality vectors θₘ − θ₀ (flattened, or
    per row along the last axis with `filter_wise`). As mergekit does: each cosine's norm product is
    floored at 1e-6 (a zero vector gives cosine 0) and each cosine clamped to [−1, 1]; negative
    cosines are not clamped to 0, so t may be negative or above 1; where |1 + (K−1) cos| < 1e-6 the
    ratio has no finite value and t = 0 (the seed). Needs at least two experts."""
    if len(inputs.experts) < 2:
        raise MergeError(f"{inputs.target}: model_stock needs at least two experts, got {len(inputs.experts)}")
    origin, weights = inputs.origin, list(inputs.experts.values())
    shape = origin.shape
    if options.filter_wise:
        if origin.dim() == 1:
            origin, weights = origin.unsqueeze(0), [w.unsqueeze(0) for w in weights]
    else:
        origin, weights = origin.reshape(-1), [w.reshape(-1) for w in weights]
    offsets = [w - origin for w in weights]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(weights)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), count * cos / safe)
    average = sum(weights) / count
    return (t * average + (1 - t) * origin).reshape(shape)


# --------------------------------------------------------------------------- SLERP
class SlerpOptions(StrictConfig):
    t: float = Field(0.5, ge=0.0, le=1.0, description="position from the first expert (0) to the second (1)")


@register_method("slerp", SlerpOptions, max_experts=2)
def slerp_merge(inputs: MergeInputs, options: SlerpOptions) -> torch.Tensor:
    """SLERP of two experts in modality order (v before l before vl): t = 0 gives the first, 1 the second.

    As mergekit's `slerp`: the angle from the normalised flattened tensors (a norm at most 1e-8 taken as
    1), cos clamped to [−1, 1]; where |cos| > 0.9995 (colinear or antipodal) linear interpolation,
    else sin((1−t)θ)/sin θ·a + sin(tθ)/sin θ·b of the unnormalised tensors. Computed in float32 (float64
    for float64 inputs), returned in the inputs' dtype. Exactly two experts."""
    if len(inputs.experts) != 2:
        raise MergeError(
            f"{inputs.target}: slerp takes exactly two experts, got {len(inputs.experts)} "
            f"({', '.join(m.value for m in inputs.experts)}); merge with --experts retrieval, vqa or nlvr2, "
            "or use another method"
        )
    first, second = inputs.experts.values()
    return slerp(options.t, first, second)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors of one shape, flattened (mergekit's `slerp` for one tensor)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    t = torch.tensor(t, dtype=dtype)  # (1 - t) in the computing dtype, as mergekit's batched t
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a, coef_b = torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


# --------------------------------------------------------------------------- Karcher mean
class KarcherOptions(StrictConfig):
    max_iter: int = Field(KARCHER_STEPS, ge=1, le=1000, description="most Riemannian gradient steps")
    tol: float = Field(
        KARCHER_TOL, gt=0.0, lt=1.0, description="a norm, angle or step below this counts as zero (mergekit's)"
    )


@register_method("karcher", KarcherOptions, compute_bound=True)
def karcher(inputs: MergeInputs, options: KarcherOptions) -> torch.Tensor:
    """Karcher mean (mergekit's `karcher`): the experts' Fréchet mean on the unit sphere times their mean norm.

    The direction u minimises Σₘ arccos(⟨u, θₘ/‖θₘ‖⟩)², found by at most `max_iter` Riemannian gradient
    steps from the normalised mean of the directions, u ← cos‖g‖·u + sin‖g‖·g/‖g‖ with the tangent
    g = (1/K) Σₘ θ/sin θ·(eₘ − cos θ·u); it stops once ‖g‖ < `tol`. Each flattened tensor counts once;
    tensors of norm at most `tol` give no direction (all of them: zero), but their norm still enters
    the mean norm (1/K) Σₘ ‖θₘ‖. Computed in float32 (float64 for float64 inputs), returned in the
    inputs' dtype. One expert is returned as it is."""
    weights = list(inputs.experts.values())
    if len(weights) == 1:
        return weights[0].clone()
    return karcher_mean(weights, options.max_iter, options.tol)


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equally weighted Karcher mean of tensors of one shape, flattened (mergekit's `karcher_merge_tensors`)."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    flat = [t.reshape(-1).to(dtype) for t in tensors]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    alpha = 1.0 / len(flat)
    live = [x / norm for x, norm in zip(flat, norms) if norm.item() > tol]  # unit directions
    if not live:
        return torch.zeros_like(tensors[0])
    weight = alpha / sum(alpha for _ in live)  # 1 / (live count), rounded as mergekit rounds it
    mean = torch.zeros_like(live[0])
    for unit in live:
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = live[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in live:
            cos = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - cos * mean)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    scale = sum(alpha * norm for norm in norms)
    return (scale * mean).reshape(tensors[0].shape).to(tensors[0].dtype)
