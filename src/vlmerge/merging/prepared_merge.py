"""A validated merge and the stream of its tensors: each merge group's inputs read (their values
checked: NaN, Inf), merged by the method, and let go before the next group is read."""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm import tqdm

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import MergeError
from vlmerge.core.numerics import all_finite
from vlmerge.core.threads import one_thread
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.io.grams import GramSet
from vlmerge.io.statistics import FisherSet
from vlmerge.merging.coefficients import ResolvedOptions
from vlmerge.merging.fisher import group_fisher
from vlmerge.merging.plan import MergeGroup, MergePlan
from vlmerge.merging.registry import MergeInputs, MergeMethod, MergeWarning, Statistics
from vlmerge.merging.side_by_side import WarningsByThread, ordered_map
from vlmerge.models.config import ModelConfig


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]  # native merged key -> tensor (empty when streamed to a file)
    plan: MergePlan
    method: str
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    source_parameters: int = 0
    merged_parameters: int = 0
    path: Path | None = None
    prepared: BaseModel | None = None  # what the method's pre-pass found, e.g. global TIES' cut-offs
    coefficients: ResolvedOptions | None = None  # the options each merged tensor got (`options`: as given)

    @property
    def parameter_ratio(self) -> float:
        return self.merged_parameters / self.source_parameters


@dataclass
class PreparedMerge:
    """A validated merge whose output names, dtypes and shapes are known before any tensor is read."""

    reader: CheckpointReader
    plan: MergePlan
    method: MergeMethod
    coefficients: ResolvedOptions  # the options of each merged tensor
    config: ModelConfig | None  # the source's model config (stored, or read from its shapes), read once
    origin: CheckpointReader | None = None
    grams: GramSet | None = None
    fisher: FisherSet | None = None
    prepass: BaseModel | None = None  # what the method's pre-pass found, e.g. global TIES' cut-offs
    warnings: list[str] = field(default_factory=list)

    def output_layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        passthrough = [(k, self.reader.dtype(k), tuple(self.reader.shape(k))) for k in self.plan.passthrough]
        merged = [(g.target, self.reader.dtype(next(iter(g.experts.values())).key), g.shape) for g in self.plan.groups]
        return passthrough + merged

    def tensors(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Merged tensors in `output_layout` order, one group in memory at a time (a compute-bound method:
        one per core, merged side by side). Every group is merged on one intra-op thread, so the bytes do
        not depend on the machine's thread count; torch runs on one thread while the stream is open."""
        for key in self.plan.passthrough:
            yield key, _read_finite(self.reader, key)
        workers = torch.get_num_threads() if self.method.compute_bound else 1
        groups = tqdm(self.plan.groups, desc=f"merge ({self.method.name})", disable=not progress, unit="tensor")
        with one_thread(), WarningsByThread(MergeWarning) as caught:

            def read(group: MergeGroup) -> tuple[MergeGroup, MergeInputs, list[str]]:
                with caught.recording() as messages:  # in this thread, in the groups' order
                    inputs = group_inputs(
                        group, self.reader, self.method, self.origin, self.grams, self.prepass, self.fisher
                    )
                return group, inputs, messages

            def merge(job: tuple[MergeGroup, MergeInputs, list[str]]) -> tuple[str, torch.Tensor, list[str]]:
                group, inputs, messages = job
                with caught.recording() as raised:
                    merged = _merge_inputs(self.method, inputs, self.coefficients.at(group.target))
                return group.target, merged, messages + raised

            for target, merged, messages in ordered_map(merge, map(read, groups), workers):
                self.warnings += messages
                yield target, merged
                del merged  # not alive beside the next group's inputs

    def result(self, tensors: dict[str, torch.Tensor] | None = None) -> MergeResult:
        return MergeResult(
            tensors or {},
            self.plan,
            self.method.name,
            self.coefficients.given,
            self.warnings,
            sum(self.reader.numel(k) for k in self.reader.keys),
            sum(int(torch.Size(shape).numel()) for _, _, shape in self.output_layout()),
            prepared=self.prepass,
            coefficients=self.coefficients,
        )


def _merge_inputs(method: MergeMethod, inputs: MergeInputs, options: StrictConfig) -> torch.Tensor:
    if len(inputs.experts) == 1:  # a layer with a single selected expert just copies it
        return next(iter(inputs.experts.values()))
    result = method.fn(inputs, options).to(_dtype(inputs.experts))
    if not all_finite(result):
        raise MergeError(f"{method.name} produced NaN or Inf for {inputs.target}")
    return result


def group_inputs(
    group: MergeGroup,
    reader: CheckpointReader,
    method: MergeMethod,
    origin: CheckpointReader | None,
    grams: GramSet | None,
    prepass: BaseModel | None = None,
    fisher: FisherSet | None = None,
) -> MergeInputs:
    """What the method gets for one group: its experts, and the origin and statistics it reads."""
    experts = {m: _read_finite(reader, e.key) for m, e in group.experts.items()}
    if len(experts) == 1:
        return MergeInputs(group.target, experts)
    return MergeInputs(
        target=group.target,
        experts=experts,
        origin=_read_finite(origin, group.target).to(_dtype(experts)) if method.needs_origin else None,
        grams=_GroupGrams(group.gram_keys(), grams) if method.needs_grams and group.is_linear_weight else None,
        fisher=group_fisher(group, fisher) if method.statistics is Statistics.FISHER else None,
        prepared=prepass,
    )


def _read_finite(reader: CheckpointReader, key: str) -> torch.Tensor:
    tensor = reader.get(key)
    if not all_finite(tensor):
        raise MergeError(f"{reader.path}: tensor {key} contains NaN or Inf")
    return tensor


def _dtype(experts: Mapping[Any, torch.Tensor]) -> torch.dtype:
    return next(iter(experts.values())).dtype


class _GroupGrams(Mapping):
    """A group's Gram matrices by expert (None where the file has none), each read from the Gram file
    when it is looked up and not kept: a method that takes one at a time holds one at a time (a
    base-size FFN's are 72 MB each in float64). Each lookup reads the file again; `row_reader`
    reads an expert's matrix a band of rows at a time (RegMean never holds a whole one)."""

    def __init__(self, modules: Mapping, grams: GramSet) -> None:
        self._modules, self._grams = modules, grams

    def __getitem__(self, modality: object) -> torch.Tensor | None:
        module = self._modules[modality]
        return self._grams.get(module) if module in self._grams else None

    def row_reader(self, modality: object) -> Callable[[int, int], torch.Tensor] | None:
        """`read(start, stop)`: rows start:stop of the expert's matrix; None where the file has none."""
        module = self._modules[modality]
        return (lambda start, stop: self._grams.rows(module, start, stop)) if module in self._grams else None

    def __iter__(self) -> Iterator:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)
