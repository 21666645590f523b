"""Merge methods: small pure functions from expert tensors to one merged tensor.

Each method takes a `MergeInputs` (the experts of one merged tensor, and where needed the
seed checkpoint's tensor as origin, the experts' Gram matrices and what the method's own
pre-pass found over the whole model) plus its validated options, and returns a new tensor;
inputs are never modified. The walk over parameters lives in the engine, written once.
Register a new method with `@register_method` (merging/registry.py).
"""

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import MergeError
from vlmerge.core.modality import Modality
from vlmerge.merging.registry import MergeInputs, MergeWarning, register_method


# --------------------------------------------------------------------------- interpolation
class InterpolationOptions(StrictConfig):
    ratio: float = Field(0.5, ge=0.0, le=1.0, description="weight of the vision expert")


def interpolation_weights(modalities: frozenset[Modality], ratio: float) -> dict[Modality, float]:
    """r V + (1-r) L; with a vl expert, (2/3) r V + (2/3)(1-r) L + (1/3) VL (the paper's ratios)."""
    if modalities == {Modality.V, Modality.L}:
        return {Modality.V: ratio, Modality.L: 1.0 - ratio}
    if modalities == {Modality.V, Modality.L, Modality.VL}:
        return {Modality.V: 2 / 3 * ratio, Modality.L: 2 / 3 * (1.0 - ratio), Modality.VL: 1 / 3}
    raise MergeError(
        f"interpolation is defined for experts {{v, l}} or {{v, l, vl}}, got {sorted(m.value for m in modalities)}"
    )


@register_method("interpolation", InterpolationOptions)
def interpolation(inputs: MergeInputs, options: InterpolationOptions) -> torch.Tensor:
    """Weighted average of the experts, r V + (1 - r) L."""
    weights = interpolation_weights(frozenset(inputs.experts), options.ratio)
    return weighted_sum([(weights[m], w) for m, w in inputs.experts.items()])


def weighted_sum(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum of w * t, accumulated in place: one output buffer, no temporary per term (merges are
    memory-bound, and a base-size merge sums hundreds of MB)."""
    (first_weight, first), *rest = terms
    out = torch.mul(first, first_weight)
    for weight, tensor in rest:
        out.add_(tensor, alpha=weight)
    return out


# --------------------------------------------------------------------------- arithmetic
class ArithmeticOptions(StrictConfig):
    lam: float = Field(0.5, description="scale of the summed modality vectors")


@register_method("arithmetic", ArithmeticOptions, needs_origin=True)
def arithmetic(inputs: MergeInputs, options: ArithmeticOptions) -> torch.Tensor:
    """Modality arithmetic: theta_0 + lam * sum_m (theta_m - theta_0), origin never aliased."""
    return inputs.origin + options.lam * sum(inputs.modality_vectors().values())


# --------------------------------------------------------------------------- RegMean
class RegMeanOptions(StrictConfig):
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="off-diagonal scale of each Gram matrix")


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): RegMean's regulariser towards plain averaging; that is
    alpha G with G's own diagonal, built in one new matrix."""
    shrunk = gram * alpha
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


@register_method("regmean", RegMeanOptions, needs_grams=True)
def regmean(inputs: MergeInputs, options: RegMeanOptions) -> torch.Tensor:
    """RegMean: W* = (sum_m W_m G_m)(sum_m G_m)^-1 for linear weights; plain mean otherwise."""
    if inputs.grams is None:
        return plain_mean(inputs.experts)
    missing = [m.value for m, g in inputs.grams.items() if g is None]
    if missing:
        warnings.warn(f"{inputs.target}: no Gram matrix for expert(s) {missing}; using the plain average", MergeWarning)
        return plain_mean(inputs.experts)
    empty = [m.value for m, g in inputs.grams.items() if not bool(g.any())]
    if empty:  # no token reached the expert: solving with it would drop it, or zero the weight if all are empty
        warnings.warn(
            f"{inputs.target}: Gram matrix of expert(s) {empty} is all zero (no tokens); using the plain average",
            MergeWarning,
        )
        return plain_mean(inputs.experts)
    weighted, gram_sum = None, None  # sum_m W_m G_m (out, in) and sum_m G_m, one shrunk matrix alive at a time
    for modality, weight in inputs.experts.items():
        gram = shrink_gram(inputs.grams[modality].to(torch.float64), options.alpha)
        product = weight.to(torch.float64) @ gram
        weighted = product if weighted is None else weighted.add_(product)
        gram_sum = gram if gram_sum is None else gram_sum.add_(gram)
    return solve_right(weighted, gram_sum, inputs.target).to(next(iter(inputs.experts.values())).dtype)


def solve_right(weighted: torch.Tensor, gram_sum: torch.Tensor, target: str) -> torch.Tensor:
    """X with X @ S = A for symmetric PSD S, via Cholesky; least squares if S is singular."""
    factor, info = torch.linalg.cholesky_ex(gram_sum)
    if int(info) == 0:
        return torch.cholesky_solve(weighted.T, factor).T
    warnings.warn(
        f"{target}: summed Gram matrix is singular; using the minimum-norm least-squares solution", MergeWarning
    )
    return torch.linalg.lstsq(gram_sum, weighted.T, driver="gelsd").solution.T


def plain_mean(experts: Mapping[Modality, torch.Tensor]) -> torch.Tensor:
    return sum(experts.values()) / len(experts)


# --------------------------------------------------------------------------- TIES
class TiesOptions(StrictConfig):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each modality vector kept")
    lam: float = Field(1.0, description="scale of the merged modality vector")
    scope: Literal["tensor", "global"] = Field(
        "tensor", description="trim top-k per tensor (streams) or over the model"
    )


class TiesThresholds(StrictConfig):
    """What the pre-pass of TIES with scope=global finds: per modality, the magnitude cut-off of its trim."""

    thresholds: dict[Modality, float]


def kept_count(numel: int, density: float) -> int:
    return max(1, math.ceil(density * numel - 1e-9))  # 0.07 * 100 must keep 7, not 8


def trim_to_top_k(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries largest in magnitude, zero the rest."""
    keep = kept_count(vector.numel(), density)
    if keep >= vector.numel():
        return vector.clone()
    flat = vector.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(vector)


def ties_global_thresholds(all_inputs: Iterable[MergeInputs], options: TiesOptions) -> TiesThresholds | None:
    """For scope=global: the magnitude of the k-th largest entry of each modality's whole vector."""
    if options.scope == "tensor":
        return None
    magnitudes: dict[Modality, list[torch.Tensor]] = defaultdict(list)
    for inputs in all_inputs:
        for modality, vector in inputs.modality_vectors().items():
            magnitudes[modality].append(vector.abs().flatten().float())
    thresholds = {}
    for modality, parts in magnitudes.items():
        values = torch.cat(parts)
        rank = values.numel() - kept_count(values.numel(), options.density) + 1  # k-th largest = rank-th smallest
        thresholds[modality] = float(values.kthvalue(rank).values)
    return TiesThresholds(thresholds=thresholds)


def trim(vector: torch.Tensor, modality: Modality, density: float, cutoffs: TiesThresholds | None) -> torch.Tensor:
    if cutoffs is None:
        return trim_to_top_k(vector, density)
    return torch.where(vector.abs() >= cutoffs.thresholds[modality], vector, torch.zeros_like(vector))


@register_method("ties", TiesOptions, needs_origin=True, prepare=ties_global_thresholds)
def ties(inputs: MergeInputs, options: TiesOptions) -> torch.Tensor:
    """TIES on modality vectors: trim, elect the sign by total mass, mean of the agreeing entries."""
    if options.scope == "global" and inputs.prepared is None:
        raise MergeError(
            f"{inputs.target}: TIES with scope=global needs the cut-offs of its pre-pass over the whole "
            "model (merge through vlmerge.merging.merge, which runs it)"
        )
    trimmed = torch.stack([trim(v, m, options.density, inputs.prepared) for m, v in inputs.modality_vectors().items()])
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(dim=0).clamp(min=1)
    merged = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0) / count
    return inputs.origin + options.lam * merged


# --------------------------------------------------------------------------- DARE
class DareOptions(StrictConfig):
    drop: float = Field(0.5, ge=0.0, lt=1.0, description="probability of dropping each entry")
    lam: float = Field(0.5, description="scale of the summed rescaled modality vectors")
    random_seed: int = Field(0, description="random seed of the drop masks")


def dare_generator(random_seed: int, target: str, modality: Modality) -> torch.Generator:
    """A generator per (random seed, tensor, expert): masks do not depend on merge order."""
    digest = hashlib.sha256(f"{random_seed}:{target}:{modality.value}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@register_method("dare", DareOptions, needs_origin=True)
def dare(inputs: MergeInputs, options: DareOptions) -> torch.Tensor:
    """DARE: drop entries of each modality vector at random, rescale by 1/(1-p), then add."""
    total = torch.zeros_like(inputs.origin)
    for modality, vector in inputs.modality_vectors().items():
        generator = dare_generator(options.random_seed, inputs.target, modality)
        keep = torch.rand(vector.shape, generator=generator) >= options.drop
        total = total + torch.where(keep, vector, torch.zeros_like(vector)) / (1.0 - options.drop)
    return inputs.origin + options.lam * total
