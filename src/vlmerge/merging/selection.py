"""Merges that choose, entry by entry, among the modality vectors tau_m = theta_m - theta_0.

MagMax keeps each entry's largest move; SCE keeps the entries where the experts differ most, weighs
the experts by how far they moved, and drops the moves against the majority sign. Both take any
number of experts and never modify their inputs.
"""

import torch
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.merging.registry import MergeInputs, register_method

SCE_FLOOR = 1e-6  # sce: floor of the summed weights of an entry, and of all weights (uniform below), as mergekit's


# --------------------------------------------------------------------------- MagMax
class MagMaxOptions(StrictConfig):
    lam: float = Field(0.5, description="scale of the selected modality vector (0.5: the MagMax release's)")


@register_method("magmax", MagMaxOptions, needs_origin=True)
def magmax(inputs: MergeInputs, options: MagMaxOptions) -> torch.Tensor:
    """MagMax (Marczak et al., ECCV 2024): per entry, the modality vector of largest magnitude; θ₀ + λ·that.

    τ*ᵢ = τₘᵢ for m = argmaxₘ |τₘᵢ|, experts taken in modality order (v, l, vl) with a later one winning a
    tie (|τ| ≥ the running best), as the official release and FusionBench's `magmax` fold them."""
    selected = None
    for weight in inputs.experts.values():
        vector = weight - inputs.origin
        selected = vector if selected is None else torch.where(vector.abs() >= selected.abs(), vector, selected)
    return inputs.origin + options.lam * selected


# --------------------------------------------------------------------------- SCE
class SceOptions(StrictConfig):
    select_topk: float = Field(
        1.0, gt=0.0, le=1.0, description="fraction of entries kept, those whose modality vectors vary most (mergekit's)"
    )


@register_method("sce", SceOptions, needs_origin=True)
def sce(inputs: MergeInputs, options: SceOptions) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat; mergekit's `sce`): select varying entries, weigh by Σ τ², erase minority signs.

    Select: below `select_topk` 1, only the floor(k·n) entries of largest variance across the experts
    (population variance, n the entries of nonzero variance) are kept in every τₘ. Calculate: expert m
    weighs wₘ = mean(τₘ²) / Σₘ mean(τₘ²) over the tensor (1/M where that sum is below 1e-6). Erase:
    per entry, the majority sign is that of Σₘ τₘ (+ where it is 0) and the other experts' entries are
    dropped. θ₀ + Σₘ wₘ τₘ / Σₘ wₘ over the experts kept at each entry (that sum floored at 1e-6)."""
    origin = inputs.origin
    vectors = torch.stack([w - origin for w in inputs.experts.values()])  # (M, *shape)
    if options.select_topk < 1:
        vectors = vectors * sce_mask(vectors, options.select_topk).unsqueeze(0)
    weights = sce_weights(vectors).view(-1, *[1] * (vectors.dim() - 1))  # (M, 1, ...)
    majority = (vectors.sum(dim=0) >= 0).to(vectors.dtype) * 2 - 1
    kept = weights * (vectors.sign() == majority)
    return origin + (vectors * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=SCE_FLOOR)


def sce_mask(vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 on the floor(select_topk * n) entries whose variance across the experts is largest, n the entries
    of nonzero variance; 0 elsewhere. In the vectors' dtype, the shape of one vector."""
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_weights(vectors: torch.Tensor) -> torch.Tensor:
    """Each expert's mean squared entry, normalised to sum to 1; equal weights where they are all ~0."""
    weights = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < SCE_FLOOR:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total
