"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

Each entry of a merged tensor is the experts' average weighted by their diagonal Fisher,
theta = sum_m F_m theta_m / sum_m F_m, elementwise, in float64. An expert's Fisher (training/fisher.py,
`vlmerge fisher`) comes from the gradients that reach its parameters, that is from the tokens routed
to it, so the weighting says how much each expert's own data constrains each of its entries.

- `fisher_floor`: each F_m is raised to at least this before weighting, the paper's max(F, floor)
  (its code uses 1e-6; FusionBench adds 1e-6 instead). Default 0: the Fisher here is a squared batch
  gradient whose scale follows the loss and the batch size, so an absolute floor of the paper's size
  could outweigh it.
- `normalize`: weigh each expert's Fisher by 1 / its L2 norm over every merged tensor, the paper's
  and FusionBench's default, which gives every model the same total vote. Off by default: the experts'
  Fishers come from one loss on one data sample, so their relative size is information (as RegMean's
  Gram matrices are not divided by the token count).

Fallbacks, each a MergeWarning: an expert the file has no statistics for, or whose Fisher of the
tensor is all zero (no token reached it), gives the tensor's plain average (the zero would otherwise
drop that expert silently); entries whose Fisher is zero in every expert (nothing constrains them)
take the plain average of those entries.
"""

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable

import torch
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import MergeError
from vlmerge.core.modality import Modality
from vlmerge.io.statistics import FisherSet
from vlmerge.merging.methods import plain_mean
from vlmerge.merging.plan import MergeGroup, MergePlan
from vlmerge.merging.registry import MergeInputs, MergeWarning, Statistics, register_method


class FisherOptions(StrictConfig):
    fisher_floor: float = Field(0.0, ge=0.0, description="each expert's Fisher is raised to at least this")
    normalize: bool = Field(False, description="weigh each expert's Fisher by 1 / its L2 norm over the model")


class FisherNorms(StrictConfig):
    """What the pre-pass of `normalize` finds: per modality, the L2 norm of its Fisher over the merged tensors."""

    norms: dict[Modality, float]


def fisher_norms(all_inputs: Iterable[MergeInputs], options: FisherOptions) -> FisherNorms | None:
    if not options.normalize:
        return None
    squares: dict[Modality, float] = defaultdict(float)
    for inputs in all_inputs:
        for modality, fisher in (inputs.fisher or {}).items():
            if fisher is not None:
                squares[modality] += float(fisher.double().square().sum())
    return FisherNorms(norms={m: math.sqrt(total) for m, total in squares.items()})


@register_method("fisher", FisherOptions, statistics=Statistics.FISHER, prepare=fisher_norms)
def fisher(inputs: MergeInputs, options: FisherOptions) -> torch.Tensor:
    """Fisher merging (Matena & Raffel 2022): sum_m F_m theta_m / sum_m F_m, elementwise."""
    if inputs.fisher is None:  # called without statistics: nothing to weigh by
        return plain_mean(inputs.experts)
    missing = [m.value for m, f in inputs.fisher.items() if f is None]
    if missing:
        warnings.warn(
            f"{inputs.target}: no Fisher statistics for expert(s) {missing}; using the plain average", MergeWarning
        )
        return plain_mean(inputs.experts)
    empty = [m.value for m, f in inputs.fisher.items() if not bool(f.any())]
    if empty:
        warnings.warn(
            f"{inputs.target}: Fisher of expert(s) {empty} is all zero (no token reached them); using the plain average",
            MergeWarning,
        )
        return plain_mean(inputs.experts)
    scale = _expert_scales(inputs, options)
    numerator, total = None, None  # sum_m c_m F_m theta_m and sum_m c_m F_m, in float64
    for modality, weight in inputs.experts.items():
        importance = inputs.fisher[modality].to(torch.float64).clamp(min=options.fisher_floor) * scale[modality]
        term = importance * weight.to(torch.float64)
        numerator = term if numerator is None else numerator.add_(term)
        total = importance if total is None else total.add_(importance)
    unconstrained = total == 0
    merged = numerator / torch.where(unconstrained, 1.0, total)
    if bool(unconstrained.any()):
        count = int(unconstrained.sum())
        warnings.warn(
            f"{inputs.target}: {count} of {total.numel()} entries have zero Fisher in every expert; "
            "using the plain average there",
            MergeWarning,
        )
        merged = torch.where(unconstrained, plain_mean(inputs.experts).to(torch.float64), merged)
    return merged.to(next(iter(inputs.experts.values())).dtype)


def _expert_scales(inputs: MergeInputs, options: FisherOptions) -> dict[Modality, float]:
    """1 / ||F_m|| with `normalize` (an expert whose Fisher is zero everywhere keeps 1), else 1."""
    if not options.normalize:
        return {m: 1.0 for m in inputs.experts}
    if inputs.prepared is None:
        raise MergeError(
            f"{inputs.target}: Fisher merging with normalize=true needs the norms of its pre-pass over the "
            "whole model (merge through vlmerge.merging.merge, which runs it)"
        )
    norms = inputs.prepared.norms
    return {m: 1.0 / norms[m] if norms.get(m) else 1.0 for m in inputs.experts}


# --------------------------------------------------------------------------- the engine's checks
def group_fisher(group: MergeGroup, fisher: FisherSet) -> dict[Modality, torch.Tensor | None]:
    """Each expert's statistics for one merged tensor; None where the file has none."""
    return {m: fisher.get(e.key) if e.key in fisher else None for m, e in group.experts.items()}


def validate_fisher(plan: MergePlan, fisher: FisherSet) -> None:
    """From names and shapes alone: the file has statistics for this merge, each of its expert's shape
    (that they are floating point, `open_fisher` checked). Values (finite, non-negative) are checked as they stream through, like the weights'."""
    needed = [(g, e.key) for g in plan.groups if len(g.experts) > 1 for e in g.experts.values()]
    if needed and not any(key in fisher for _, key in needed):
        raise MergeError(f"Fisher file {fisher.path} has none of the tensors this merge needs (e.g. {needed[0][1]})")
    for group, key in needed:
        if key not in fisher:
            continue
        if tuple(fisher.shape(key)) != group.shape:
            raise MergeError(
                f"Fisher statistics {key} are {list(fisher.shape(key))} but the expert tensor is {list(group.shape)}"
            )
