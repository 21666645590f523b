"""Mergeability of a modality-specific checkpoint: distances between the experts to be merged.

Each merged tensor's experts are compared pairwise (mean over pairs when there are three),
optionally as differences from a reference such as the seed checkpoint, then aggregated
per layer and for the whole model as means weighted by entry count.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from vlmerge.core.errors import MergeError
from vlmerge.core.threads import one_thread
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.merging.plan import ExpertSelection, build_merge_plan
from vlmerge.metrics.distances import DEFAULT_TOP_K, METRICS, metric_fn


@dataclass
class TensorDistances:
    target: str
    layer: int
    numel: int
    experts: list[str]
    values: dict[str, float]


@dataclass
class MergeabilityReport:
    tensors: list[TensorDistances]
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)
    model: dict[str, float] = field(default_factory=dict)
    relative_to_reference: bool = False

    def as_dict(self) -> dict:
        return {
            "relative_to_reference": self.relative_to_reference,
            "model": self.model,
            "per_layer": {str(layer): values for layer, values in self.per_layer.items()},
            "tensors": [vars(t) for t in self.tensors],
        }

    def format_table(self, per_tensor: bool = False) -> str:
        """One row per layer and one for the model (first every tensor, if `per_tensor`), a column per metric."""
        names = list(self.model)
        rows = [(f"layer {layer}", values) for layer, values in self.per_layer.items()] + [("model", self.model)]
        if per_tensor:
            rows = [(t.target, t.values) for t in self.tensors] + rows
        lines = [f"{'':<36}" + "".join(f"{n:>14}" for n in names)]
        lines += [f"{label:<36}" + "".join(f"{values[n]:>14.4f}" for n in names) for label, values in rows]
        return "\n".join(lines)


@one_thread()  # the same numbers on every machine (core/threads.py)
def mergeability(
    reader: CheckpointReader,
    *,
    reference: CheckpointReader | None = None,
    selection: str = "all",
    metrics: list[str] | None = None,
    top_k: float = DEFAULT_TOP_K,
) -> MergeabilityReport:
    """Distances between the experts of every merged tensor, before any merge; `selection`: which
    experts a merge would combine (all, retrieval, vqa, nlvr2)."""
    names = metrics or METRICS.names()
    functions = {name: metric_fn(name, top_k) for name in names}
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys}, ExpertSelection.parse(selection))
    rows = []
    for group in plan.groups:
        if len(group.experts) < 2:
            continue
        tensors = {m: reader.get(e.key).double() for m, e in group.experts.items()}
        if reference is not None:
            if group.target not in reference:
                raise MergeError(f"reference checkpoint {reference.path} has no tensor {group.target}")
            origin = reference.get(group.target).double()
            tensors = {m: t - origin for m, t in tensors.items()}
        pairs = list(combinations(tensors.values(), 2))
        values = {name: sum(fn(x, y) for x, y in pairs) / len(pairs) for name, fn in functions.items()}
        rows.append(
            TensorDistances(
                group.target, group.layer, tensors[next(iter(tensors))].numel(), [m.value for m in tensors], values
            )
        )
    return MergeabilityReport(
        rows, _aggregate_by_layer(rows, names), _weighted_mean(rows, names), reference is not None
    )


def _weighted_mean(rows: list[TensorDistances], names: list[str]) -> dict[str, float]:
    total = sum(r.numel for r in rows)
    return {name: sum(r.values[name] * r.numel for r in rows) / total for name in names} if total else {}


def _aggregate_by_layer(rows: list[TensorDistances], names: list[str]) -> dict[int, dict[str, float]]:
    by_layer: dict[int, list[TensorDistances]] = defaultdict(list)
    for row in rows:
        by_layer[row.layer].append(row)
    return {layer: _weighted_mean(layer_rows, names) for layer, layer_rows in sorted(by_layer.items())}
