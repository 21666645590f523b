"""`vlmerge tune`: search a merge method's options on validation data, write the best merge.

A grid is one `GridAxis` per searched option (`lam=0.3:1.0:8`, evenly spaced and inclusive, or
`scope=tensor,global`); several axes give their product, in the order given, the last varying
fastest. Every candidate is checked by the method's options class before anything is merged. The
inputs are opened once; each candidate is merged in memory from those open files and scored on the
validation split only: zero-shot retrieval (its primary metric), or a linear probe (the task head
trained on the training split by the fine-tuning code, the merged model frozen, scored on
validation). The test split is never read. The best candidate, the first of equals, is written as
`vlmerge merge` writes it, with the search table in its merge record (under "search").

It lives outside `vlmerge.merging` because it scores merges with `vlmerge.tasks`.
"""

import contextlib
import itertools
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Self, Union, get_args, get_origin

import torch
from pydantic import Field, model_validator

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.core.registry import suggest
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import check_data, load_source
from vlmerge.io.atomic import check_output_path, remove_stale_temporaries, scratch_folder
from vlmerge.io.checkpoint import CARRIED_METADATA, CheckpointReader, open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams
from vlmerge.io.layout import Layout
from vlmerge.io.statistics import open_fisher
from vlmerge.merging import MERGE_METHODS, MergeResult, method_options
from vlmerge.merging.coefficients import parse_options, resolve_options
from vlmerge.merging.engine import MergeFiles, PreparedMerge, check_output_layout, write_merge
from vlmerge.merging.plan import ExpertSelection, MergePlan, build_merge_plan
from vlmerge.models.checkpoint import head_names
from vlmerge.models.config import ModelConfig
from vlmerge.models.families import checkpoint_config
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks import TASKS, Task
from vlmerge.tasks.base import Evaluation
from vlmerge.tasks.finetune import TASK_HEAD, run_finetune
from vlmerge.training.config import FinetuneConfig
from vlmerge.training.pretrain import HEADS
from vlmerge.training.setup import checkpoint_data, checkpoint_tokenizer

SPLIT = "val"  # every candidate is scored here, and the test split is never read
TRAIN_SPLIT = "train"  # the probe's head trains here
SIGNIFICANT_DIGITS = 12  # grid points are rounded so that 0.3:1.0:8 gives 0.4, not 0.39999999999999997
MAX_CANDIDATES = 10_000  # each candidate is a merge and an evaluation: a bigger grid is a typo, not a plan


@dataclass(frozen=True)
class GridAxis:
    """The values one option takes in the search, typed as the option is (float, int, bool, choice)."""

    name: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str, method: str) -> Self:
        """`NAME=START:STOP:COUNT` (COUNT evenly spaced points, both ends included; numeric options)
        or `NAME=A,B,C`; NAME as in `--option` (`random-seed` is `random_seed`)."""
        name, equals, spec = text.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or not name:
            raise ConfigError(f"--grid {_shown(text)}: expected NAME=START:STOP:COUNT or NAME=A,B,C")
        kind = _option_kind(method, name)
        where = f"--grid {_shown(text)}"
        if not spec.strip():
            raise ConfigError(f"{where}: the grid is empty; give NAME=START:STOP:COUNT or NAME=A,B,C")
        if ":" in spec and kind in (int, float):
            values = _linspace(spec, kind, where)
        else:
            items = spec.split(",")
            if len(items) > MAX_CANDIDATES:
                raise ConfigError(
                    f"{where}: more than {MAX_CANDIDATES} values; tune scores at most that many candidates"
                )
            values = tuple(_scalar(item.strip(), kind, where) for item in items)
        repeated = [value for value, times in Counter(values).items() if times > 1]
        if repeated:
            raise ConfigError(f"{where}: gives {repeated[0]!r} more than once")
        return cls(name, values)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values)}


def parse_grid(texts: Sequence[str | GridAxis], method: str, fixed: Mapping[str, Any] | None = None) -> list[GridAxis]:
    """The axes of `--grid` flags (or given as GridAxis), checked against each other and the fixed options."""
    MERGE_METHODS.get(method)  # an unknown method is named before its options are looked for
    axes = [text if isinstance(text, GridAxis) else GridAxis.parse(text, method) for text in texts]
    if not axes:
        raise ConfigError(f"the grid is empty: give --grid NAME=... for at least one option of {method}")
    names = [axis.name for axis in axes]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise ConfigError(f"--grid names {name!r} twice; give all its values in one --grid")
    check_grid_size(axes)
    fixed_names = {key.replace("-", "_") for key in fixed or {}}
    both = [name for name in names if name in fixed_names]
    if both:
        raise ConfigError(f"option {both[0]!r} is both fixed and searched; drop one of the two")
    return axes


def check_grid_size(axes: Sequence[GridAxis]) -> int:
    """The number of candidates, the product of the axes' lengths, computed before any is made;
    one error above MAX_CANDIDATES."""
    size = math.prod(len(axis.values) for axis in axes)
    if size > MAX_CANDIDATES:
        lengths = " x ".join(str(len(axis.values)) for axis in axes)
        raise ConfigError(
            f"the grid has {size} candidates ({lengths}); tune scores at most {MAX_CANDIDATES}: search fewer points"
        )
    return size


def grid_points(axes: Sequence[GridAxis], method: str, fixed: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every point of the grid, the fixed options beside it, in the product's order (the last axis
    fastest). Each value is checked by the method's options first, alone, so that an error names it;
    coefficient specs among the fixed options are checked tensor by tensor by `candidate_options`."""
    check_grid_size(axes)
    merge_method = MERGE_METHODS.get(method)
    fixed = {key.replace("-", "_"): value for key, value in (fixed or {}).items()}
    parse_options(merge_method, fixed)
    for axis in axes:
        for value in axis.values:
            try:
                parse_options(merge_method, {**fixed, axis.name: value})
            except ConfigError as error:
                raise ConfigError(f"--grid {axis.name}={value}: {error}") from None
    names = [axis.name for axis in axes]
    return [{**fixed, **dict(zip(names, values))} for values in itertools.product(*(a.values for a in axes))]


def candidate_options(method: str, points: Sequence[Mapping[str, Any]], plan: MergePlan) -> list[dict[str, Any]]:
    """Each point's options as its merge records them (every option, defaults filled in, specs as
    given), validated at every merged tensor of `plan`: no value out of bounds reaches a merge."""
    return [resolve_options(MERGE_METHODS.get(method), point, plan).given for point in points]


class TuneObjective(StrictConfig):
    """What each candidate is scored by, on the validation split: zero-shot retrieval, or a linear
    probe of `task` (`probe_steps` of the fine-tuning code with the backbone frozen). Every candidate's
    probe starts from the same seeded head and sees the same batches."""

    kind: Literal["retrieval", "probe"] = "retrieval"
    task: str = "retrieval"
    probe_steps: int = Field(50, ge=1, description="training steps of each candidate's probe")
    probe_batch_size: int = Field(32, ge=2)
    probe_lr: FiniteFloat = Field(1e-3, gt=0)
    random_seed: int = Field(0, description="the probe's head initialisation and batch order")

    @model_validator(mode="after")
    def _zero_shot_is_retrieval(self) -> Self:
        if self.kind == "retrieval" and self.task != "retrieval":
            raise ValueError(f"zero-shot scoring is retrieval only; probe {self.task!r} with kind 'probe'")
        return self


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
    source: str | os.PathLike,
    method: str,
    grid: Sequence[str | GridAxis],
    fixed: Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike,
    objective: TuneObjective | None = None,
    data: DataConfig | None = None,
    selection: str = "all",
    seed_checkpoint: str | os.PathLike | None = None,
    grams: str | os.PathLike | None = None,
    layout: Layout | str = Layout.NATIVE,
    allow_foreign_grams: bool = False,
    fisher: str | os.PathLike | None = None,
    allow_foreign_fisher: bool = False,
    input_layout: Layout | str | None = None,
    progress: bool = False,
    on_candidate: Callable[[int, int, Candidate], None] | None = None,
    data_file: str | os.PathLike | None = None,
) -> TuneResult:
    """Score every grid point of `method` on `data`'s validation split, write the best to `out`.

    Every check that needs no merge comes first: the output path (against every input: checkpoints,
    statistics, `data_file`, the YAML `data` was read from, and the files the data names), the grid
    against the method's options (names, types, bounds), the inputs and the plan, the objective
    against the checkpoint and the data. `data` defaults to the emoji data at the checkpoint's image
    size; `on_candidate(index, total, candidate)` is called as each candidate is scored. Temporaries
    that an earlier, killed run left beside `out` are removed; a probe's candidates are written there."""
    objective = objective or TuneObjective()
    axes = parse_grid(grid, method, fixed)
    points = grid_points(axes, method, fixed)
    check_output_path(out, [source, seed_checkpoint, grams, fisher, *_data_inputs(data, data_file)])
    reader = open_checkpoint(source, input_layout)
    check_output_layout(reader, layout)
    plan = build_merge_plan({key: reader.shape(key) for key in reader.keys}, ExpertSelection.parse(selection))
    candidates = candidate_options(method, points, plan)
    files = MergeFiles(
        reader,
        open_checkpoint(seed_checkpoint) if seed_checkpoint is not None else None,
        open_grams(grams) if grams is not None else None,
        open_fisher(fisher) if fisher is not None else None,
    )

    def prepared(options: Mapping[str, Any]) -> PreparedMerge:
        return files.prepare(
            method,
            options,
            selection=selection,
            allow_foreign_grams=allow_foreign_grams,
            allow_foreign_fisher=allow_foreign_fisher,
        )

    first = prepared(points[0])  # the inputs and the plan, checked before the scorer reads data
    data = data or checkpoint_data(reader)
    if objective.kind == "probe":
        scorer = ProbeScorer(reader, data, objective, beside=out)
    else:
        scorer = RetrievalScorer(reader, data)
    remove_stale_temporaries(out)
    merges = (first if index == 0 else prepared(point) for index, point in enumerate(points))
    scored = _score(merges, candidates, axes, scorer, on_candidate)
    best = best_index([c.score for c in scored])
    table = SearchTable(method, objective, scorer.metric, SPLIT, data, tuple(axes), tuple(scored), best)
    result = write_merge(
        prepared(points[best]), out, layout=layout, progress=progress, record={"search": table.as_dict()}
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


class RetrievalScorer:
    """Zero-shot retrieval of a merged state dict, in memory: the task (its data and tokenised
    validation examples) is built once; each candidate gets a model and keeps the checkpoint's heads,
    as `vlmerge evaluate --task retrieval --split val` of the written file would."""

    metric = TASKS.get("retrieval").primary_metric

    def __init__(self, reader: CheckpointReader, data: DataConfig) -> None:
        finetuned = reader.metadata.get("task")
        if finetuned not in (None, "retrieval"):
            raise ConfigError(f"{reader.path} was fine-tuned for {finetuned!r}; score it with a probe, not retrieval")
        self.config, self.task = _candidate_task(reader, data, "retrieval")
        names = head_names(reader)
        name = TASK_HEAD if TASK_HEAD in names else HEADS if HEADS in names else None
        if name is None:
            raise CheckpointError(
                f"{reader.path}: has no pre-training heads, which zero-shot retrieval scores with; use a probe"
            )
        self.head = self.task.make_head(self.config)
        state = _head_state(reader, name)
        if name == TASK_HEAD:
            self.head.load_state_dict(state, strict=True)
        else:
            self.task.init_head(self.head, state)
        self.head_prefixes = tuple(f"{name}." for name in names)
        _check_split(self.task, SPLIT, reader.path)

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Evaluation:
        model = VLTransformer(self.config)
        backbone = {key: value for key, value in tensors.items() if not key.startswith(self.head_prefixes)}
        model.load_state_dict(backbone, strict=True)
        return self.task.evaluate(model, self.head, SPLIT)


class ProbeScorer:
    """A linear probe of each merged state dict, by the fine-tuning code (`run_finetune` with
    `freeze_backbone`): it reads its init from a file, so each candidate is saved to a temporary
    folder, probed there on the training split, scored on validation, and deleted. The folder is
    beside `beside` (the tune's output) where given, so that the next run there removes one a kill
    left; in the system's temporary directory otherwise."""

    def __init__(
        self,
        reader: CheckpointReader,
        data: DataConfig,
        objective: TuneObjective,
        beside: str | os.PathLike | None = None,
    ) -> None:
        self.beside = beside
        self.metric = TASKS.get(objective.task).primary_metric
        self.config, task = _candidate_task(reader, data, objective.task)
        size = _check_split(task, TRAIN_SPLIT, reader.path)
        if size < objective.probe_batch_size:
            raise ConfigError(f"probe batch size {objective.probe_batch_size} exceeds the {size} training examples")
        _check_split(task, SPLIT, reader.path)
        self.metadata = {"format": "vlmerge", "config": self.config.model_dump_json()}
        self.metadata.update({key: reader.metadata[key] for key in CARRIED_METADATA if key in reader.metadata})
        self.finetune = {
            "task": objective.task,
            "steps": objective.probe_steps,
            "checkpoint_every": objective.probe_steps,
            "random_seed": objective.random_seed,
            "eval_split": SPLIT,
            "freeze_backbone": True,
            "data": data.model_dump(mode="json"),
            "optimizer": {"batch_size": objective.probe_batch_size, "lr": objective.probe_lr},
        }
        FinetuneConfig.parse({**self.finetune, "init": ""}, where="probe")

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Evaluation:
        with self._folder() as tmp:
            init = save_checkpoint(Path(tmp) / "candidate.safetensors", tensors, self.metadata)
            config = FinetuneConfig.parse({**self.finetune, "init": str(init)}, where="probe")
            return run_finetune(config, Path(tmp) / "probe", progress=False)

    def _folder(self) -> contextlib.AbstractContextManager:
        if self.beside is None:
            return tempfile.TemporaryDirectory(prefix="vlmerge-tune-")
        return scratch_folder(self.beside)


def _data_inputs(data: DataConfig | None, data_file: str | os.PathLike | None) -> list[str | os.PathLike]:
    """The files the data is read from: the YAML config it came from (a dataset name is no file)
    and the local paths it names."""
    inputs: list[str | os.PathLike] = list(data.paths.values()) if data is not None else []
    if data_file is not None and os.fspath(data_file).endswith((".yaml", ".yml")):
        inputs.append(data_file)
    return inputs


def _candidate_task(reader: CheckpointReader, data: DataConfig, name: str) -> tuple[ModelConfig, Task]:
    """The merged model's config and the task over the data, checked against each other (as `load_task`)."""
    task_class = TASKS.get(name)
    check_data(data, [task_class.use])
    config = checkpoint_config(reader)
    if config is None:
        raise CheckpointError(f"{reader.path}: no model config in its metadata; cannot build merged models to score")
    config = config.agnostic()
    if config.image_size != data.image_size:
        raise ConfigError(
            f"{reader.path}: the model takes {config.image_size}px images but the data is "
            f"{data.image_size}px; set data.image_size: {config.image_size}"
        )
    tokenizer = checkpoint_tokenizer(reader, config.max_text_len)
    return config, task_class(load_source(data), tokenizer)


def _check_split(task: Task, split: str, path: Path) -> int:
    size = task.num_examples(split)
    if size == 0:
        raise ConfigError(f"{path}: the data's {split} split is empty; nothing to score candidates on")
    return size


def _head_state(reader: CheckpointReader, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {key[len(prefix) :]: reader.get(key) for key in reader.keys if key.startswith(prefix)}


def _option_kind(method: str, name: str) -> Any:
    """What a grid value of option `name` is parsed as: float, int, bool, str, or a tuple of choices."""
    fields = MERGE_METHODS.get(method).options.model_fields
    if name not in fields:
        others = method_options().get(name)
        if others is not None:
            raise ConfigError(
                f"method {method!r} has no option {name!r} (an option of {', '.join(others.methods)}); "
                f"its options: {', '.join(fields) or 'none'}"
            )
        raise ConfigError(f"unknown option {name!r} of method {method!r}{suggest(name, list(fields))}")
    annotation = fields[name].annotation
    kinds = (
        [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType)
        else [annotation]
    )
    for kind in kinds:
        if get_origin(kind) is Literal:
            return tuple(get_args(kind))
        if isinstance(kind, type) and issubclass(kind, Enum):
            return tuple(member.value for member in kind)
    for scalar in (bool, float, int, str):  # bool first: a bool option takes true/false, not numbers
        if scalar in kinds:
            return scalar
    raise ConfigError(f"option {name!r} of {method!r} takes JSON; give it as a fixed --option, not a grid")


def _shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, shortened: a grid may be thousands of values long."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def _scalar(text: str, kind: Any, where: str) -> Any:
    if not text:
        raise ConfigError(f"{where}: an empty value in the list")
    if isinstance(kind, tuple):
        matches = [choice for choice in kind if str(choice) == text]
        if not matches:
            raise ConfigError(f"{where}: {_shown(text)} is not a choice of the option ({', '.join(map(str, kind))})")
        return matches[0]
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{where}: {_shown(text)} is not true or false")
        return text.lower() == "true"
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{where}: {_shown(text)} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):  # an int of any size is exact: no float to overflow
        raise ConfigError(f"{where}: {_shown(text)} is not a finite number")
    return value


def _linspace(spec: str, kind: type, where: str) -> tuple[Any, ...]:
    parts = spec.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{where}: a range is START:STOP:COUNT")
    start, stop = (_scalar(part.strip(), kind, where) for part in parts[:2])
    count = _scalar(parts[2].strip(), int, where)
    if count < 2:
        raise ConfigError(f"{where}: a range needs a COUNT of at least 2; give one value as NAME=VALUE")
    if count > MAX_CANDIDATES:
        raise ConfigError(f"{where}: a COUNT above {MAX_CANDIDATES}; tune scores at most that many candidates")
    if kind is int:  # exact: integers of any size, no float in between
        step, rest = divmod(stop - start, count - 1)
        if rest:
            raise ConfigError(f"{where}: the {count} evenly spaced points are not all integers")
        return tuple(start + step * i for i in range(count))
    points = [start + (stop - start) * i / (count - 1) for i in range(count)]
    if not all(math.isfinite(point) for point in points):
        raise ConfigError(f"{where}: the range's width overflows a float; give a narrower range")
    return tuple(float(f"{point:.{SIGNIFICANT_DIGITS}g}") for point in points)
