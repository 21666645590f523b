"""The merge engine: validate -> plan -> stream -> method -> atomic write.

Every problem that shapes alone reveal (missing experts, shape mismatches, a seed checkpoint
or Gram file that does not fit) is reported before the first tensor is read; values (NaN,
Inf) are checked as tensors stream through. The output only appears, atomically, once the
whole merge has succeeded.
"""

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlmerge import __version__
from vlmerge.core.errors import MergeError
from vlmerge.io.checkpoint import CheckpointReader, file_sha256, open_checkpoint, reader_from_state_dict, save_checkpoint
from vlmerge.io.grams import GramSet, open_grams
from vlmerge.io.layout import Layout, to_reference_key
from vlmerge.merging.methods import MERGE_METHODS, MergeInputs, MergeMethod, MergeWarning
from vlmerge.merging.plan import ExpertSelection, MergeGroup, MergePlan, build_merge_plan


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]  # native merged key -> tensor
    plan: MergePlan
    method: str
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    source_parameters: int = 0
    merged_parameters: int = 0
    path: Path | None = None

    @property
    def parameter_ratio(self) -> float:
        return self.merged_parameters / self.source_parameters


def merge_checkpoint(source: str | os.PathLike, method: str, options: Mapping[str, Any] | None = None, *,
                     out: str | os.PathLike, experts: str = "all", seed_checkpoint: str | os.PathLike | None = None,
                     grams: str | os.PathLike | None = None, layout: Layout | str = Layout.NATIVE,
                     progress: bool = False) -> MergeResult:
    """Merge a modality-specific checkpoint file into a modality-agnostic one written to `out`."""
    reader = open_checkpoint(source)
    origin = open_checkpoint(seed_checkpoint) if seed_checkpoint is not None else None
    gram_set = open_grams(grams) if grams is not None else None
    result = merge(reader, method, options, experts=experts, origin=origin, grams=gram_set, progress=progress)
    metadata = _provenance(reader, result, origin, gram_set)
    layout = Layout(layout)
    tensors = result.tensors if layout is Layout.NATIVE else {to_reference_key(k): v for k, v in result.tensors.items()}
    result.path = save_checkpoint(out, tensors, metadata)
    return result


def merge_state_dict(state: Mapping[str, torch.Tensor], method: str, options: Mapping[str, Any] | None = None, *,
                     experts: str = "all", seed_state: Mapping[str, torch.Tensor] | None = None,
                     grams: GramSet | None = None) -> MergeResult:
    """In-memory merge, for notebooks and the study runner."""
    origin = reader_from_state_dict(seed_state, "<seed>") if seed_state is not None else None
    return merge(reader_from_state_dict(state), method, options, experts=experts, origin=origin, grams=grams)


def merge(reader: CheckpointReader, method_name: str, options: Mapping[str, Any] | None = None, *,
          experts: str = "all", origin: CheckpointReader | None = None, grams: GramSet | None = None,
          progress: bool = False) -> MergeResult:
    method = MERGE_METHODS.get(method_name)
    parsed_options = method.options.parse(dict(options or {}), where=f"{method_name} options")
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys}, ExpertSelection.parse(experts))
    _validate_inputs(plan, method, origin, grams)
    if method.prepare is not None:  # a pre-pass over every merged group, e.g. TIES' global top-k
        multi = [g for g in plan.groups if len(g.experts) > 1]
        parsed_options = method.prepare((_group_inputs(g, reader, method, origin, grams) for g in multi), parsed_options)

    merged: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key in plan.passthrough:
        merged[key] = _read_finite(reader, key)
    for group in tqdm(plan.groups, desc=f"merge ({method_name})", disable=not progress, unit="tensor"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MergeWarning)
            merged[group.target] = _merge_group(group, reader, method, parsed_options, origin, grams)
        notes += [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]
    for note in notes:
        warnings.warn(note, MergeWarning, stacklevel=2)
    return MergeResult(merged, plan, method.name, parsed_options.model_dump(mode="json"), notes,
                       sum(reader.numel(k) for k in reader.keys), sum(t.numel() for t in merged.values()))


def _merge_group(group: MergeGroup, reader: CheckpointReader, method: MergeMethod, options,
                 origin: CheckpointReader | None, grams: GramSet | None) -> torch.Tensor:
    inputs = _group_inputs(group, reader, method, origin, grams)
    if len(inputs.experts) == 1:  # a layer with a single selected expert just copies it
        return next(iter(inputs.experts.values()))
    result = method.fn(inputs, options).to(_dtype(inputs.experts))
    if not torch.isfinite(result).all():
        raise MergeError(f"{method.name} produced NaN or Inf for {group.target}")
    return result


def _group_inputs(group: MergeGroup, reader: CheckpointReader, method: MergeMethod,
                  origin: CheckpointReader | None, grams: GramSet | None) -> MergeInputs:
    experts = {m: _read_finite(reader, e.key) for m, e in group.experts.items()}
    if len(experts) == 1:
        return MergeInputs(group.target, experts)
    return MergeInputs(
        target=group.target,
        experts=experts,
        origin=_read_finite(origin, group.target).to(_dtype(experts)) if method.needs_origin else None,
        grams=_group_grams(group, grams) if method.needs_grams and group.is_linear_weight else None,
    )


def _group_grams(group: MergeGroup, grams: GramSet) -> dict:
    return {m: grams.get(module) if module in grams else None for m, module in group.gram_keys().items()}


def _validate_inputs(plan: MergePlan, method: MergeMethod, origin: CheckpointReader | None, grams: GramSet | None) -> None:
    if method.needs_origin:
        if origin is None:
            raise MergeError(f"method {method.name!r} needs the seed checkpoint as origin (--seed-checkpoint)")
        for group in plan.groups:
            if group.target not in origin:
                raise MergeError(f"seed checkpoint {origin.path} has no tensor {group.target}")
            if tuple(origin.shape(group.target)) != group.shape:
                raise MergeError(f"seed checkpoint {group.target} has shape {list(origin.shape(group.target))}, "
                                 f"experts have {list(group.shape)}")
    if method.needs_grams:
        if grams is None:
            raise MergeError(f"method {method.name!r} needs Gram matrices (--grams)")
        _validate_grams(plan, grams)


def _validate_grams(plan: MergePlan, grams: GramSet) -> None:
    needed = [(g, m) for g in plan.groups if g.is_linear_weight and len(g.experts) > 1 for m in g.gram_keys().values()]
    if needed and not any(module in grams for _, module in needed):
        raise MergeError(f"Gram file {grams.path} has none of the matrices this merge needs (e.g. {needed[0][1]})")
    for group, module in needed:
        if module in grams:
            inputs = group.shape[1]
            if tuple(grams.shape(module)) != (inputs, inputs):
                raise MergeError(f"Gram matrix {module} is {list(grams.shape(module))} but {group.target} "
                                 f"takes {inputs} inputs (expected [{inputs}, {inputs}])")


def _read_finite(reader: CheckpointReader, key: str) -> torch.Tensor:
    tensor = reader.get(key)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise MergeError(f"{reader.path}: tensor {key} contains NaN or Inf")
    return tensor


def _dtype(experts: Mapping[Any, torch.Tensor]) -> torch.dtype:
    return next(iter(experts.values())).dtype


def _provenance(reader: CheckpointReader, result: MergeResult, origin: CheckpointReader | None,
                grams: GramSet | None) -> dict[str, str]:
    inputs = {"source": reader.path}
    if origin is not None:
        inputs["seed_checkpoint"] = origin.path
    if grams is not None:
        inputs["grams"] = grams.path
    record = {
        "method": result.method,
        "options": result.options,
        "experts": result.plan.selection.value,
        "inputs": {role: {"path": str(path), "sha256": file_sha256(path)} for role, path in inputs.items()},
        "warnings": result.warnings,
        "vlmerge_version": __version__,
    }
    metadata = {"format": "vlmerge", "merge": json.dumps(record, sort_keys=True)}
    config = reader.config
    if config is not None:
        metadata["config"] = json.dumps({**config, "experts": "none"}, sort_keys=True)
    return metadata


