"""The search of `vlmerge tune`: the inputs opened once, each grid point merged in memory from those
open files and scored, the best (the first of equals) written as `vlmerge merge` writes it, with the
search table in its merge record (under "search")."""

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from vlmerge.core.errors import CheckpointError
from vlmerge.data.config import DataConfig
from vlmerge.io.atomic import check_output_path, remove_stale_temporaries
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging import MergeRequest, MergeResult
from vlmerge.merging.engine import MergeFiles, PreparedMerge, check_output_layout, write_merge
from vlmerge.merging.plan import build_merge_plan
from vlmerge.training.setup import checkpoint_data
from vlmerge.tuning.grid import GridAxis, candidate_options, grid_points, parse_grid
from vlmerge.tuning.scorers import SPLIT, TRAIN_SPLIT, ProbeScorer, RetrievalScorer, TuneObjective


@dataclass(frozen=True)
class Candidate:
    searched: dict[str, Any]  # the grid's values at this point
    options: dict[str, Any]  # every option of the method as the merge used it
    score: float  # the objective's primary metric on the validation split
    metrics: dict[str, float]


@dataclass(frozen=True)
class SearchTable:
    """The whole search, as recorded in the best merge's metadata (`as_dict` / `from_dict`)."""

    method: str
    objective: TuneObjective
    metric: str
    split: str
    data: DataConfig
    grid: tuple[GridAxis, ...]
    candidates: tuple[Candidate, ...]
    best: int  # index into candidates: the highest score, the first one on a tie

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "objective": self.objective.model_dump(mode="json"),
            "metric": self.metric,
            "split": self.split,
            "train_split": TRAIN_SPLIT if self.objective.kind == "probe" else None,
            "data": self.data.model_dump(mode="json"),
            "grid": [axis.as_dict() for axis in self.grid],
            "candidates": [
                {"searched": c.searched, "options": c.options, "score": c.score, "metrics": c.metrics}
                for c in self.candidates
            ],
            "best": self.best,
            "tie_break": "first",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            data["method"],
            TuneObjective.parse(data["objective"], where="search objective"),
            data["metric"],
            data["split"],
            DataConfig.parse(data["data"], where="search data"),
            tuple(GridAxis(axis["name"], tuple(axis["values"])) for axis in data["grid"]),
            tuple(Candidate(c["searched"], c["options"], c["score"], c["metrics"]) for c in data["candidates"]),
            data["best"],
        )


@dataclass(frozen=True)
class TuneResult:
    table: SearchTable
    merge: MergeResult  # the best candidate, as written

    @property
    def best(self) -> Candidate:
        return self.table.candidates[self.table.best]


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score; the first of equal ones (the grid's order decides ties)."""
    best = 0
    for index, score in enumerate(scores):
        if score > scores[best]:
            best = index
    return best


def read_search_table(path: str | os.PathLike) -> SearchTable:
    """The search table a `vlmerge tune` output carries in its merge record."""
    record = open_checkpoint(path).metadata_json("merge", {})
    if not isinstance(record, dict) or "search" not in record:
        raise CheckpointError(f"{path}: records no option search; was it written by `vlmerge tune`?")
    return SearchTable.from_dict(record["search"])


def tune_checkpoint(
    source: MergeRequest | str | os.PathLike,
    method: str,
    grid: Sequence[str | GridAxis],
    fixed: Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike,
    objective: TuneObjective | None = None,
    data: DataConfig | None = None,
    progress: bool = False,
    on_candidate: Callable[[int, int, Candidate], None] | None = None,
    data_file: str | os.PathLike | None = None,
    **fields: Any,
) -> TuneResult:
    """Score every grid point of `method` on `data`'s validation split, write the best to `out`.

    `source`: a `MergeRequest`, or the source's path with the request's other fields as keywords (as
    `merge_checkpoint`). Every check that needs no merge comes first: the grid against the method's
    options (names, types, bounds), the output path (against every input: checkpoints, statistics,
    `data_file`, the YAML `data` was read from, and the files the data names), the inputs and the plan,
    the objective against the checkpoint and the data. `data` defaults to the emoji data at the
    checkpoint's image size; `on_candidate(index, total, candidate)` is called as each candidate is
    scored. Temporaries that an earlier, killed run left beside `out` are removed; a probe's
    candidates are written there."""
    objective = objective or TuneObjective()
    axes = parse_grid(grid, method, fixed)
    points = grid_points(axes, method, fixed)
    request = MergeRequest.of(source, **fields)
    check_output_path(out, [*request.inputs, *_data_inputs(data, data_file)])
    reader = open_checkpoint(request.source, request.input_layout)
    check_output_layout(reader, request.layout)
    plan = build_merge_plan({key: reader.shape(key) for key in reader.keys}, request.selection)
    candidates = candidate_options(method, points, plan)
    files = MergeFiles.open(request, reader)
    first = files.prepare(method, points[0])  # the inputs and the plan, checked before the scorer reads data
    data = data or checkpoint_data(reader)
    if objective.kind == "probe":
        scorer = ProbeScorer(reader, data, objective, beside=out, overrides=request.overrides)
    else:
        scorer = RetrievalScorer(reader, data, overrides=request.overrides)
    remove_stale_temporaries(out)
    merges = (first if index == 0 else files.prepare(method, point) for index, point in enumerate(points))
    scored = _score(merges, candidates, axes, scorer, on_candidate)
    best = best_index([c.score for c in scored])
    table = SearchTable(method, objective, scorer.metric, SPLIT, data, tuple(axes), tuple(scored), best)
    record = {"search": table.as_dict()}
    result = write_merge(
        files.prepare(method, points[best]), out, layout=request.layout, progress=progress, record=record
    )
    return TuneResult(table, result)


def _score(
    merges: Iterable[PreparedMerge],
    candidates: Sequence[dict[str, Any]],
    axes: Sequence[GridAxis],
    scorer: "RetrievalScorer | ProbeScorer",
    on_candidate: Callable[[int, int, Candidate], None] | None,
) -> list[Candidate]:
    """Each candidate merged in memory (one at a time) and scored."""
    scored = []
    for index, (merge, options) in enumerate(zip(merges, candidates)):
        evaluation = scorer(dict(merge.tensors()))
        searched = {axis.name: options[axis.name] for axis in axes}
        scored.append(Candidate(searched, options, evaluation.metrics[scorer.metric], dict(evaluation.metrics)))
        if on_candidate is not None:
            on_candidate(index, len(candidates), scored[-1])
    return scored


def _data_inputs(data: DataConfig | None, data_file: str | os.PathLike | None) -> list[str | os.PathLike]:
    """The files the data is read from: the YAML config it came from (a dataset name is no file)
    and the local paths it names."""
    inputs: list[str | os.PathLike] = list(data.paths.values()) if data is not None else []
    if data_file is not None and os.fspath(data_file).endswith((".yaml", ".yml")):
        inputs.append(data_file)
    return inputs
