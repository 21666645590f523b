"""Merge methods: small pure functions from expert tensors to one merged tensor.

Each method takes a `MergeInputs` (the experts of one merged tensor, and where needed the
seed checkpoint's tensor as origin, the experts' Gram matrices and what the method's own
pre-pass found over the whole model) plus its validated options, and returns a new tensor;
inputs are never modified. The walk over parameters lives in the engine, written once.
Register a new method with `@register_method` (merging/registry.py).
"""

import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from pydantic import Field, model_validator

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import MergeError
from vlmerge.core.modality import Modality
from vlmerge.merging.registry import MergeInputs, MergeWarning, register_method
from vlmerge.merging.task_vectors import (
    MagnitudeCutoffs,
    breadcrumbs,
    by_expert,
    della,
    global_magnitude_cutoffs,
    keep_all,
    magnitude,
    random_drop,
    task_vector_merge,
    trim_to_top_k,  # noqa: F401  (the metrics trim as TIES does)
)


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


# --------------------------------------------------------------------------- RegMean
GRAM_ROWS = 256  # RegMean reads and adds each Gram matrix a band of this many rows at a time


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
    sums, missing, empty = regmean_sums(inputs, options.alpha)
    if missing:
        warnings.warn(f"{inputs.target}: no Gram matrix for expert(s) {missing}; using the plain average", MergeWarning)
        return plain_mean(inputs.experts)
    if empty:  # no token reached the expert: solving with it would drop it, or zero the weight if all are empty
        warnings.warn(
            f"{inputs.target}: Gram matrix of expert(s) {empty} is all zero (no tokens); using the plain average",
            MergeWarning,
        )
        return plain_mean(inputs.experts)
    dtype = next(iter(inputs.experts.values())).dtype
    solved = solve_right_in_place(*sums)
    if solved is not None:
        return solved.to(dtype)
    warnings.warn(
        f"{inputs.target}: summed Gram matrix is singular; using the minimum-norm least-squares solution",
        MergeWarning,
    )
    weighted, gram_sum = regmean_sums(inputs, options.alpha)[0]  # the factorisation overwrote the sum
    return torch.linalg.lstsq(gram_sum, weighted.T, driver="gelsd").solution.T.to(dtype)


def regmean_sums(
    inputs: MergeInputs, alpha: float
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[str], list[str]]:
    """(sum_m W_m G~_m (out, in), sum_m G~_m) in float64, or None where an expert's Gram matrix is
    missing or all zero; and the experts whose matrix is missing, and all zero.

    Each Gram matrix is added a band of `GRAM_ROWS` rows at a time (W G~ is the sum over bands of W's
    columns times G~'s rows), so beside the two sums only a band is alive: the engine's mapping reads
    each band from the Gram file (a base-size FFN's matrix is 72 MB in float64). The band of
    G~ = alpha G + (1 - alpha) diag(G) is alpha times G's rows with G's own diagonal entries."""
    read_rows = {m: gram_rows(inputs.grams, m) for m in inputs.experts}
    missing = [m.value for m, read in read_rows.items() if read is None]
    if missing:
        return None, missing, []
    out_features, size = next(iter(inputs.experts.values())).shape
    weighted = torch.zeros(out_features, size, dtype=torch.float64)
    gram_sum = torch.empty(size, size, dtype=torch.float64)
    empty = []
    for index, (modality, weight) in enumerate(inputs.experts.items()):
        nonzero = False
        for start in range(0, size, GRAM_ROWS):
            rows = slice(start, min(start + GRAM_ROWS, size))
            band = read_rows[modality](rows.start, rows.stop).to(torch.float64)
            nonzero = nonzero or not _all_zero(band)
            if empty:  # a fallback is certain: the rest are only looked at, to name them
                continue
            shrunk = _shrink_rows(band, start, alpha)
            if index == 0:
                gram_sum[rows] = shrunk
            else:
                gram_sum[rows] += shrunk
            weighted.addmm_(weight[:, rows].to(torch.float64), shrunk)
        if not nonzero:
            empty.append(modality.value)
    return (None if empty else (weighted, gram_sum)), [], empty


def gram_rows(grams: Mapping[Modality, torch.Tensor | None], modality: Modality):
    """`read(start, stop)` -> rows start:stop of the expert's Gram matrix; None where it has none.
    The engine's mapping reads them alone from the file (`row_reader`); any other mapping is sliced."""
    row_reader = getattr(grams, "row_reader", None)
    if row_reader is not None:
        return row_reader(modality)
    gram = grams.get(modality)
    return None if gram is None else (lambda start, stop: gram[start:stop])


def _shrink_rows(band: torch.Tensor, start: int, alpha: float) -> torch.Tensor:
    """Rows start:start + len(band) of `shrink_gram(G, alpha)`, from the same rows of G."""
    if alpha == 1.0:
        return band
    shrunk = band * alpha
    diagonal = slice(start, start + len(band))
    shrunk[:, diagonal].diagonal().copy_(band[:, diagonal].diagonal())
    return shrunk


def _all_zero(gram: torch.Tensor) -> bool:
    """No token reached the expert. One pass that allocates nothing (`any()` first writes a mask)."""
    if gram.numel() == 0:
        return True
    low, high = torch.aminmax(gram)
    return bool((low == 0) & (high == 0))


def solve_right_in_place(weighted: torch.Tensor, gram_sum: torch.Tensor) -> torch.Tensor | None:
    """X with X @ S = A for A = `weighted` and symmetric S = `gram_sum`, via Cholesky, written over A
    and returned; None if S is not positive definite. S is overwritten either way (by its factor).
    LAPACK works on the transposed views (column-major, and S^T = S), so neither is copied: the two
    triangular solves are what `cholesky_solve` runs, without its copies of A and the factor."""
    factor, info = gram_sum.mT, torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if int(info) != 0:
        return None
    solution = weighted.mT  # S = L L^T, so X^T = L^-T (L^-1 A^T)
    torch.linalg.solve_triangular(factor, solution, upper=False, out=solution)
    torch.linalg.solve_triangular(factor.mT, solution, upper=True, out=solution)
    return weighted


def plain_mean(experts: Mapping[Modality, torch.Tensor]) -> torch.Tensor:
    return sum(experts.values()) / len(experts)


# --------------------------------------------------------------------------- task-vector family
# Presets of `task_vector_merge` (merging/task_vectors.py): a sparsification of each modality vector
# and a consensus, then theta_0 + lam * merged. Each keeps only the options it uses. Sum-consensus
# presets default to lam 0.5 (the mean of two experts' vectors), TIES-consensus ones to lam 1.0.
LAM_SUM = "scale of the summed modality vectors"
LAM_TIES = "scale of the merged modality vector"
RANDOM_SEED = "random seed of the drop masks"


class ArithmeticOptions(StrictConfig):
    lam: float = Field(0.5, description=LAM_SUM)


@register_method("arithmetic", ArithmeticOptions, needs_origin=True, per_expert=("lam",))
def arithmetic(inputs: MergeInputs, options: ArithmeticOptions) -> torch.Tensor:
    """Modality arithmetic: theta_0 + lam * sum_m (theta_m - theta_0), origin never aliased."""
    return task_vector_merge(inputs, keep_all(), "sum", options.lam)


class TiesOptions(StrictConfig):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each modality vector kept")
    lam: float = Field(1.0, description=LAM_TIES)
    scope: Literal["tensor", "global"] = Field(
        "tensor", description="trim top-k per tensor (streams) or over the model"
    )


def ties_global_thresholds(all_inputs: Iterable[MergeInputs], options: TiesOptions) -> MagnitudeCutoffs | None:
    """For scope=global: the magnitude of the k-th largest entry of each modality's whole vector."""
    return None if options.scope == "tensor" else global_magnitude_cutoffs(all_inputs, options.density)


@register_method(
    "ties",
    TiesOptions,
    needs_origin=True,
    prepare=ties_global_thresholds,
    per_expert=("density", "lam"),
    model_wide=("density",),  # global scope: one cut-off per expert over the whole model
)
def ties(inputs: MergeInputs, options: TiesOptions) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim to the top-k, elect signs by mass, mean of the agreeing entries."""
    if options.scope == "global" and inputs.prepared is None:
        raise MergeError(
            f"{inputs.target}: TIES with scope=global needs the cut-offs of its pre-pass over the whole "
            "model (merge through vlmerge.merging.merge, which runs it)"
        )
    sparsify = by_expert(lambda density: magnitude(density, inputs.prepared), density=options.density)
    return task_vector_merge(inputs, sparsify, "ties", options.lam)


class DareOptions(StrictConfig):
    drop: float = Field(0.5, ge=0.0, lt=1.0, description="probability of dropping each entry")
    lam: float = Field(0.5, description=LAM_SUM + " (rescaled)")
    random_seed: int = Field(0, description=RANDOM_SEED)


@register_method("dare", DareOptions, needs_origin=True, per_expert=("drop", "lam"))
def dare(inputs: MergeInputs, options: DareOptions) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop entries at random, rescale by 1/(1-p), then add."""
    sparsify = by_expert(lambda drop: random_drop(drop, options.random_seed, inputs.target), drop=options.drop)
    return task_vector_merge(inputs, sparsify, "sum", options.lam)


class DareTiesOptions(DareOptions):
    lam: float = Field(1.0, description=LAM_TIES)


@register_method("dare_ties", DareTiesOptions, needs_origin=True, per_expert=("drop", "lam"))
def dare_ties(inputs: MergeInputs, options: DareTiesOptions) -> torch.Tensor:
    """DARE's seeded drop-and-rescale, then TIES' sign election and mean of the agreeing entries."""
    sparsify = by_expert(lambda drop: random_drop(drop, options.random_seed, inputs.target), drop=options.drop)
    return task_vector_merge(inputs, sparsify, "ties", options.lam)


class BreadcrumbsOptions(StrictConfig):
    density: float = Field(0.9, gt=0.0, le=1.0, description="fraction of each modality vector kept")
    gamma: float = Field(
        0.01, ge=0.0, lt=1.0, description="fraction largest in magnitude dropped first, as outliers (mergekit's)"
    )
    lam: float = Field(0.5, description=LAM_SUM)


@register_method("breadcrumbs", BreadcrumbsOptions, needs_origin=True, per_expert=("density", "lam"))
def breadcrumbs_sum(inputs: MergeInputs, options: BreadcrumbsOptions) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop outliers and the smallest entries, then add."""
    sparsify = by_expert(lambda density: breadcrumbs(density, options.gamma), density=options.density)
    return task_vector_merge(inputs, sparsify, "sum", options.lam)


class BreadcrumbsTiesOptions(BreadcrumbsOptions):
    lam: float = Field(1.0, description=LAM_TIES)


@register_method("breadcrumbs_ties", BreadcrumbsTiesOptions, needs_origin=True, per_expert=("density", "lam"))
def breadcrumbs_ties(inputs: MergeInputs, options: BreadcrumbsTiesOptions) -> torch.Tensor:
    """Model Breadcrumbs' mask, then TIES' sign election and mean of the agreeing entries."""
    sparsify = by_expert(lambda density: breadcrumbs(density, options.gamma), density=options.density)
    return task_vector_merge(inputs, sparsify, "ties", options.lam)


class DellaOptions(StrictConfig):
    density: float = Field(0.5, gt=0.0, le=1.0, description="mean keep probability of an entry")
    epsilon: float = Field(
        0.15, ge=0.0, lt=1.0, description="keep probabilities span density +- epsilon by magnitude (mergekit's)"
    )
    lam: float = Field(0.5, description=LAM_SUM + " (rescaled)")
    random_seed: int = Field(0, description=RANDOM_SEED)

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> "DellaOptions":
        if not (0.0 < self.density - self.epsilon and self.density + self.epsilon <= 1.0):
            raise ValueError(
                f"keep probabilities density +- epsilon must lie in (0, 1], got {self.density} +- {self.epsilon}"
            )
        return self


@register_method("della", DellaOptions, needs_origin=True, per_expert=("density", "lam"))
def della_sum(inputs: MergeInputs, options: DellaOptions) -> torch.Tensor:
    """DELLA (Deep et al. 2024): keep entries with magnitude-ranked probabilities, rescale by 1/p, add."""
    sparsify = by_expert(
        lambda density: della(density, options.epsilon, options.random_seed, inputs.target), density=options.density
    )
    return task_vector_merge(inputs, sparsify, "sum", options.lam)


class DellaTiesOptions(DellaOptions):
    lam: float = Field(1.0, description=LAM_TIES + " (rescaled)")


@register_method("della_ties", DellaTiesOptions, needs_origin=True, per_expert=("density", "lam"))
def della_ties(inputs: MergeInputs, options: DellaTiesOptions) -> torch.Tensor:
    """DELLA's magnitude-ranked drop, then TIES' sign election and mean (mergekit's `della`)."""
    sparsify = by_expert(
        lambda density: della(density, options.epsilon, options.random_seed, inputs.target), density=options.density
    )
    return task_vector_merge(inputs, sparsify, "ties", options.lam)
