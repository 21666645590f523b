"""The merge engine: validate -> plan -> stream -> method -> atomic write.

Every problem that names, shapes and dtypes alone reveal (an output path that is an input,
missing experts, shape or dtype mismatches, experts that are not floating point, tensors missing
from, foreign to or shaped otherwise than the model the checkpoint's config describes, a released
file whose config its shapes do not give, a seed checkpoint or statistics file that does not fit or
whose source checkpoint cannot be verified, a tokenizer that is not one) is reported before the
first tensor is read, and so is every Gram matrix the method needs that a Gram matrix cannot
be (collected from another checkpoint, not finite, symmetric or positive semi-definite); values
of the weights (NaN, Inf), and of Fisher statistics (also negative ones), are checked as tensors
stream through. Inputs are read from the files
opened at the start, whatever their paths name later. The output only appears, atomically, once
the whole merge has succeeded.
"""

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm import tqdm

from vlmerge import __version__
from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import CheckpointError, ConfigError, MergeError
from vlmerge.core.numerics import all_finite
from vlmerge.core.threads import one_thread
from vlmerge.io.atomic import check_output_path
from vlmerge.io.checkpoint import (
    CARRIED_METADATA,
    PICKLE_SUFFIXES,
    CheckpointReader,
    open_checkpoint,
    reader_from_state_dict,
    save_checkpoint,
)
from vlmerge.io.grams import GramSet, open_grams
from vlmerge.io.layout import Layout, foreign_keys, to_layout
from vlmerge.io.statistics import FisherSet, open_fisher
from vlmerge.io.streaming import stream_safetensors
from vlmerge.merging.coefficients import ResolvedOptions, parse_options
from vlmerge.merging.fisher import group_fisher, validate_fisher
from vlmerge.merging.plan import MERGE_DTYPES, ExpertSelection, MergeGroup, MergePlan, build_merge_plan
from vlmerge.merging.registry import MERGE_METHODS, MergeInputs, MergeMethod, MergeWarning, Statistics
from vlmerge.models.checkpoint import head_names
from vlmerge.models.config import ModelConfig
from vlmerge.models.factory import state_shapes
from vlmerge.models.families import checkpoint_config

METADATA_RESERVE = 1 << 16  # bytes kept in the header for warnings known only after the merge
WARNINGS_BUDGET = METADATA_RESERVE // 2  # the most header bytes the recorded warnings take: never outgrows the reserve
WARNING_CHARACTERS = 1000  # a recorded warning line longer than this is cut
WARNING_EXAMPLES = 3  # tensors named in a line that stands for one warning repeated over many
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
GRAM_TOLERANCE = 1e-6  # relative to a Gram matrix's largest entry (symmetry) or eigenvalue (definiteness)


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
    options: StrictConfig
    origin: CheckpointReader | None
    grams: GramSet | None
    prepared: BaseModel | None = None
    warnings: list[str] = field(default_factory=list)
    fisher: FisherSet | None = None
    coefficients: ResolvedOptions | None = None  # the options of each merged tensor; `options`: the first one's
    config: ModelConfig | None = None  # the source's model config (stored, or read from its shapes)

    def output_layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        passthrough = [(k, self.reader.dtype(k), tuple(self.reader.shape(k))) for k in self.plan.passthrough]
        merged = [(g.target, self.reader.dtype(next(iter(g.experts.values())).key), g.shape) for g in self.plan.groups]
        return passthrough + merged

    def tensors(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Merged tensors in `output_layout` order, one group in memory at a time."""
        for key in self.plan.passthrough:
            yield key, _read_finite(self.reader, key)
        for group in tqdm(self.plan.groups, desc=f"merge ({self.method.name})", disable=not progress, unit="tensor"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MergeWarning)
                options = self.coefficients.at(group.target) if self.coefficients else self.options
                with one_thread():  # the same bytes whatever the machine's thread count
                    merged = _merge_group(
                        group, self.reader, self.method, options, self.origin, self.grams, self.prepared, self.fisher
                    )
            self.warnings += [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]
            yield group.target, merged
            del merged  # not alive beside the next group's inputs

    def result(self, tensors: dict[str, torch.Tensor] | None = None) -> MergeResult:
        return MergeResult(
            tensors or {},
            self.plan,
            self.method.name,
            self.coefficients.given if self.coefficients else self.options.model_dump(mode="json"),
            self.warnings,
            sum(self.reader.numel(k) for k in self.reader.keys),
            sum(int(torch.Size(shape).numel()) for _, _, shape in self.output_layout()),
            prepared=self.prepared,
            coefficients=self.coefficients,
        )


def merge_checkpoint(
    source: str | os.PathLike,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike,
    selection: str = "all",
    seed_checkpoint: str | os.PathLike | None = None,
    grams: str | os.PathLike | None = None,
    layout: Layout | str = Layout.NATIVE,
    allow_foreign_grams: bool = False,
    progress: bool = False,
    fisher: str | os.PathLike | None = None,
    allow_foreign_fisher: bool = False,
    input_layout: Layout | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Merge a modality-specific checkpoint file into a modality-agnostic one written to `out`.

    `out` is checked first (not an input, not a directory, writable), every input is opened
    once and read from that open file, and a `.safetensors` output is streamed (header first,
    one merge group in memory at a time). The source is read in `input_layout` (default: the one
    its keys show) and the output written in `layout`, a multiway layout with tied experts.
    `overrides`: fields of the source's model config, for a released file whose shapes do not tell
    them (`image_size`, `heads`).
    """
    check_output_path(out, [source, seed_checkpoint, grams, fisher])
    files = MergeFiles.open(
        source,
        seed_checkpoint=seed_checkpoint,
        grams=grams,
        fisher=fisher,
        input_layout=input_layout,
        overrides=overrides,
    )
    check_output_layout(files.reader, layout)
    prepared = files.prepare(
        method,
        options,
        selection=selection,
        allow_foreign_grams=allow_foreign_grams,
        allow_foreign_fisher=allow_foreign_fisher,
    )
    return write_merge(prepared, out, layout=layout, progress=progress)


@dataclass
class MergeFiles:
    """The input files of a merge, each opened once and read from that open file (a search merges
    many candidates from one opening)."""

    reader: CheckpointReader
    origin: CheckpointReader | None = None
    grams: GramSet | None = None
    fisher: FisherSet | None = None
    overrides: Mapping[str, Any] | None = None  # fields of the source's model config (`merge_checkpoint`)

    @classmethod
    def open(
        cls,
        source: str | os.PathLike,
        *,
        seed_checkpoint: str | os.PathLike | None = None,
        grams: str | os.PathLike | None = None,
        fisher: str | os.PathLike | None = None,
        input_layout: Layout | str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> "MergeFiles":
        return cls(
            open_checkpoint(source, input_layout),
            open_checkpoint(seed_checkpoint) if seed_checkpoint is not None else None,
            open_grams(grams) if grams is not None else None,
            open_fisher(fisher) if fisher is not None else None,
            overrides,
        )

    def prepare(
        self,
        method: str,
        options: Mapping[str, Any] | None = None,
        *,
        selection: str = "all",
        allow_foreign_grams: bool = False,
        allow_foreign_fisher: bool = False,
    ) -> PreparedMerge:
        """`prepare_merge` on these files, the statistics checked against the source file's hash."""
        return prepare_merge(
            self.reader,
            method,
            options,
            selection=selection,
            origin=self.origin,
            grams=self.grams,
            allow_foreign_grams=allow_foreign_grams,
            source_sha256=self.reader.sha256,
            fisher=self.fisher,
            allow_foreign_fisher=allow_foreign_fisher,
            overrides=self.overrides,
        )


def write_merge(
    prepared: PreparedMerge,
    out: str | os.PathLike,
    *,
    layout: Layout | str = Layout.NATIVE,
    progress: bool = False,
    record: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Write a prepared merge as `merge_checkpoint` does, from the files it has open (a search that
    merged many candidates from one opening writes its best this way). `record`: further entries of
    the file's merge record, beside the standard ones (e.g. `vlmerge tune`'s search table)."""
    layout = Layout(layout)
    check_output_layout(prepared.reader, layout)
    rename = _output_names(prepared, layout)
    if Path(out).suffix in PICKLE_SUFFIXES:
        tensors = dict(prepared.tensors(progress))
        result = prepared.result(tensors)
        renamed = {name: to_layout(v, squeeze) for k, v in tensors.items() for name, squeeze in rename(k)}
        result.path = save_checkpoint(out, renamed, _provenance(prepared, _input_hashes(prepared), record, layout))
        return result
    layout_out = [
        (name, dtype, shape[1:] if squeeze else shape)
        for k, dtype, shape in prepared.output_layout()
        for name, squeeze in rename(k)
    ]
    # The inputs are hashed beside the merge, not before it: the merge computes on one intra-op thread
    # (`one_thread`), which leaves the other cores to the hash.
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashes = hasher.submit(_input_hashes, prepared)
        placeholder = _provenance(prepared, _input_hashes(prepared, pending=True), record, layout)
        with stream_safetensors(out, layout_out, placeholder, reserve_metadata=METADATA_RESERVE) as writer:
            for key, tensor in prepared.tensors(progress):
                for name, squeeze in rename(key):
                    writer.write(name, to_layout(tensor, squeeze))
                del tensor  # written: free before the next group is merged
            writer.update_metadata(
                _provenance(prepared, hashes.result(), record, layout)
            )  # the hashes and the warnings
    result = prepared.result()
    result.path = Path(out)
    return result


# The layouts each family's weights can be written in: a layout names another family's modules.
FAMILY_LAYOUTS = {
    "native": (Layout.NATIVE, Layout.REFERENCE),
    "paper": (Layout.NATIVE, Layout.REFERENCE),
    "vlmo": (Layout.NATIVE, Layout.VLMO),
    "beit3": (Layout.NATIVE, Layout.BEIT3),
}
LAYOUT_FAMILY = {Layout.NATIVE: "native", Layout.REFERENCE: "paper", Layout.VLMO: "vlmo", Layout.BEIT3: "beit3"}


def check_output_layout(reader: CheckpointReader, layout: Layout | str) -> None:
    """Refuse, before any work, an output layout whose family is not the source's: BEiT-3's separate
    projections under VLMo's names would be a file no VLMo code can load."""
    layout = Layout(layout)
    config = _source_config(reader)
    family = config.family if config is not None else LAYOUT_FAMILY[reader.layout]
    allowed_layouts = dict.fromkeys((*FAMILY_LAYOUTS[family], reader.layout))  # its own layout, always
    if layout not in allowed_layouts:
        allowed = ", ".join(item.value for item in allowed_layouts)
        raise MergeError(
            f"{reader.path}: a {family} model cannot be written in the {layout.value} layout, which names "
            f"another family's modules; write it as {allowed}"
        )


def _output_names(prepared: PreparedMerge, layout: Layout) -> Callable[[str], list[tuple[str, bool]]]:
    """Native key -> the output's keys (each with whether its batch dimension is dropped). In the
    source's own layout a tensor passed through keeps its stored name (a wrapper prefix such as
    unilm's `beit3.` included); a merged tensor of a multiway layout is written under every expert
    its layer had in the source (tied); what the source's family stores but never reads (its index
    buffers) is left out of any other layout."""
    reader = prepared.reader
    if layout is Layout.NATIVE:
        return lambda key: [] if key in reader.mapping.unused else [(key, False)]
    same_layout = reader.layout is layout
    prefix = reader.mapping.prefix if same_layout else ""

    def names(key: str) -> list[tuple[str, bool]]:
        if same_layout and key in reader.mapping.stored:
            return [reader.mapping.stored[key]]
        if key in reader.mapping.unused:  # a family's buffers mean nothing in another layout
            return []
        return foreign_keys(key, layout, prefix, prepared.plan.layer_experts.get)

    return names


def merge_state_dict(
    state: Mapping[str, torch.Tensor],
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    selection: str = "all",
    seed_state: Mapping[str, torch.Tensor] | None = None,
    grams: GramSet | None = None,
    fisher: FisherSet | None = None,
) -> MergeResult:
    """In-memory merge, for notebooks and the study runner."""
    origin = reader_from_state_dict(seed_state, "<seed>") if seed_state is not None else None
    reader = reader_from_state_dict(state)
    return merge(reader, method, options, selection=selection, origin=origin, grams=grams, fisher=fisher)


def merge(
    reader: CheckpointReader,
    method_name: str,
    options: Mapping[str, Any] | None = None,
    *,
    selection: str = "all",
    origin: CheckpointReader | None = None,
    grams: GramSet | None = None,
    progress: bool = False,
    fisher: FisherSet | None = None,
) -> MergeResult:
    prepared = prepare_merge(
        reader, method_name, options, selection=selection, origin=origin, grams=grams, fisher=fisher
    )
    result = prepared.result(dict(prepared.tensors(progress)))
    for note in result.warnings:
        warnings.warn(note, MergeWarning, stacklevel=2)
    return result


def prepare_merge(
    reader: CheckpointReader,
    method_name: str,
    options: Mapping[str, Any] | None = None,
    *,
    selection: str = "all",
    origin: CheckpointReader | None = None,
    grams: GramSet | None = None,
    allow_foreign_grams: bool = False,
    source_sha256: Callable[[], str] | None = None,
    fisher: FisherSet | None = None,
    allow_foreign_fisher: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> PreparedMerge:
    """Validate and plan; run the method's pre-pass if it has one. Reads no expert tensor otherwise
    (the Gram matrices a method needs are read once here, to check them).
    `selection`: which experts are merged (all, retrieval, vqa, nlvr2). `source_sha256`: the source
    file's hash, compared with the checkpoint a Gram file records (None for an in-memory state dict,
    which has no file to compare); `allow_foreign_grams` lets a mismatch, or a file that records no
    checkable source, through with a warning. `fisher`, `allow_foreign_fisher`: the same for a method
    that merges with Fisher statistics. `overrides`: fields of the source's model config."""
    method = MERGE_METHODS.get(method_name)
    specs = parse_options(method, dict(options or {}))  # lists and dicts: coefficient specs (coefficients.py)
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys}, ExpertSelection.parse(selection))
    coefficients = specs.resolve(plan)  # every merged tensor's options, validated
    parsed_options = coefficients.reference
    _validate_carried_metadata(reader)
    config = merge_config(reader, overrides)
    _validate_layout(reader, config)
    _validate_dtypes(plan, reader, origin if method.needs_origin else None)
    _validate_inputs(plan, method, origin, grams, fisher, [coefficients.at(g.target) for g in plan.groups])
    notes = []
    if method.needs_grams:
        if source_sha256 is not None:
            notes = _check_statistics_source(reader, grams, source_sha256, allow_foreign_grams)
        _validate_gram_values(plan, grams)
    if method.statistics is Statistics.FISHER and source_sha256 is not None:
        notes = _check_statistics_source(
            reader, fisher, source_sha256, allow_foreign_fisher, "Fisher file", "--allow-foreign-fisher"
        )
    prepared = None
    if method.prepare is not None:  # a pre-pass over every merged group, e.g. TIES' global top-k
        multi = [g for g in plan.groups if len(g.experts) > 1]
        prepass_inputs, prepass_options = coefficients.prepass(
            (_group_inputs(g, reader, method, origin, grams, fisher=fisher) for g in multi), method.model_wide
        )
        with one_thread():
            prepared = method.prepare(prepass_inputs, prepass_options)
    return PreparedMerge(
        reader, plan, method, parsed_options, origin, grams, prepared, notes, fisher, coefficients, config
    )


def _merge_group(
    group: MergeGroup,
    reader: CheckpointReader,
    method: MergeMethod,
    options: StrictConfig,
    origin: CheckpointReader | None,
    grams: GramSet | None,
    prepared: BaseModel | None,
    fisher: FisherSet | None = None,
) -> torch.Tensor:
    inputs = _group_inputs(group, reader, method, origin, grams, prepared, fisher)
    if len(inputs.experts) == 1:  # a layer with a single selected expert just copies it
        return next(iter(inputs.experts.values()))
    result = method.fn(inputs, options).to(_dtype(inputs.experts))
    if not all_finite(result):
        raise MergeError(f"{method.name} produced NaN or Inf for {group.target}")
    return result


def _group_inputs(
    group: MergeGroup,
    reader: CheckpointReader,
    method: MergeMethod,
    origin: CheckpointReader | None,
    grams: GramSet | None,
    prepared: BaseModel | None = None,
    fisher: FisherSet | None = None,
) -> MergeInputs:
    experts = {m: _read_finite(reader, e.key) for m, e in group.experts.items()}
    if len(experts) == 1:
        return MergeInputs(group.target, experts)
    return MergeInputs(
        target=group.target,
        experts=experts,
        origin=_read_finite(origin, group.target).to(_dtype(experts)) if method.needs_origin else None,
        grams=_group_grams(group, grams) if method.needs_grams and group.is_linear_weight else None,
        fisher=group_fisher(group, fisher) if method.statistics is Statistics.FISHER else None,
        prepared=prepared,
    )


def _group_grams(group: MergeGroup, grams: GramSet) -> "_GroupGrams":
    return _GroupGrams(group.gram_keys(), grams)


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


def merge_config(reader: CheckpointReader, overrides: Mapping[str, Any] | None = None) -> ModelConfig | None:
    """The source's model config: stored, or read from a released file's shapes, `overrides` on top.
    A released file whose shapes do not give one is refused here (its message says what to give): its
    merge would carry no config, and no later stage could load it. None for a native file without one."""
    for name in ("image_size", "heads"):  # sizes the model's own checks let through at zero or below
        value = (overrides or {}).get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    config = checkpoint_config(reader, overrides)
    if config is None and overrides:
        given = ", ".join(sorted(overrides))
        raise MergeError(
            f"{reader.path}: carries no model config and its shapes give none, so there is nothing to set "
            f"{given} in; merge it without them"
        )
    return config


def _validate_layout(reader: CheckpointReader, config: ModelConfig | None) -> None:
    """Every tensor of the model `config` describes must be there with its shape, and nothing else but
    heads and what the family stores unread, or the merged checkpoint would not load strictly
    (`vlmerge evaluate`, `export-hf`). Names and shapes only: built on the meta device."""
    if config is None:
        return
    expected = state_shapes(config)
    backbone = _backbone_keys(reader, expected)
    unknown = [key for key in backbone if key not in expected]
    if unknown:
        close = get_close_matches(unknown[0], list(expected), n=1)
        hint = f"; did you mean {_stored_name(reader, close[0])!r}?" if close else ""
        raise CheckpointError(
            f"{reader.path}: unknown tensor {_stored_name(reader, unknown[0])!r}, not part of the model its "
            f"config describes{hint}{_more(reader, unknown, 'unknown')}"
        )
    missing = [key for key in expected if key not in reader]
    if missing:
        raise CheckpointError(
            f"{reader.path}: missing tensor {_stored_name(reader, missing[0])!r}, which the model its config "
            f"describes needs{_more(reader, missing, 'missing')}"
        )
    misshapen = [key for key in expected if tuple(reader.shape(key)) != expected[key]]
    if misshapen:
        key = misshapen[0]
        raise CheckpointError(
            f"{reader.path}: tensor {_stored_name(reader, key)!r} has shape {_stored_shape(reader, key)}, but the "
            f"model its config describes has {_stored_shape(reader, key, expected[key])}"
            f"{_more(reader, misshapen, 'of another shape')}"
        )


def _backbone_keys(reader: CheckpointReader, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The source's keys that must be the model's: all but its heads (a native file names them in its
    metadata; in a released file they are the keys its layout does not rename that lie outside the
    model's modules, such as `itm_score.*`) and what its family stores but never reads (index buffers)."""
    heads = tuple(f"{name}." for name in head_names(reader))
    modules = {key.split(".")[0] for key in expected}
    released = reader.layout is not Layout.NATIVE

    def is_head(key: str) -> bool:
        if heads and key.startswith(heads):
            return True
        renamed = reader.mapping.stored[key][0] != key
        return released and not renamed and key.split(".")[0] not in modules

    return [key for key in reader.keys if key not in reader.mapping.unused and not is_head(key)]


def _stored_name(reader: CheckpointReader, key: str) -> str:
    """A native key as the source's file names it (its layout's name where the file lacks it)."""
    if key in reader:
        return reader.mapping.stored[key][0]
    return foreign_keys(key, reader.layout, reader.mapping.prefix)[0][0]


def _stored_shape(reader: CheckpointReader, key: str, shape: tuple[int, ...] | None = None) -> list[int]:
    """A native shape (the source's own where None) as the source's file stores it."""
    shape = tuple(reader.shape(key)) if shape is None else shape
    batched = key in reader and reader.mapping.stored[key][1]
    return list(shape[1:] if batched else shape)


def _more(reader: CheckpointReader, keys: Sequence[str], what: str) -> str:
    """` (N more <what>: a, b, c, ...)` after the first of `keys`; empty when it is the only one."""
    if len(keys) < 2:
        return ""
    named = ", ".join(_stored_name(reader, key) for key in keys[1 : 1 + WARNING_EXAMPLES])
    return f" ({len(keys) - 1} more {what}: {named}{', ...' if len(keys) > 1 + WARNING_EXAMPLES else ''})"


def _validate_inputs(
    plan: MergePlan,
    method: MergeMethod,
    origin: CheckpointReader | None,
    grams: GramSet | None,
    fisher: FisherSet | None = None,
    options: Iterable[StrictConfig] = (),
) -> None:
    """`options`: those of the merged tensors, for a method that checks how its statistics were collected."""
    if method.needs_origin:
        if origin is None:
            raise MergeError(f"method {method.name!r} needs the seed checkpoint as origin (--seed-checkpoint)")
        for group in plan.groups:
            if group.target not in origin:
                raise MergeError(f"seed checkpoint {origin.path} has no tensor {group.target}")
            if tuple(origin.shape(group.target)) != group.shape:
                raise MergeError(
                    f"seed checkpoint {group.target} has shape {list(origin.shape(group.target))}, "
                    f"experts have {list(group.shape)}"
                )
    if method.needs_grams:
        if grams is None:
            raise MergeError(f"method {method.name!r} needs Gram matrices (--grams)")
        _validate_grams(plan, grams)
    if method.statistics is Statistics.FISHER:
        if fisher is None:
            raise MergeError(f"method {method.name!r} needs Fisher statistics (--fisher)")
        validate_fisher(plan, fisher)
    if method.check_statistics is not None:  # collected the way this merge needs, with every tensor's options?
        distinct = {each.model_dump_json(): each for each in options}
        for each in distinct.values():
            method.check_statistics(grams if method.needs_grams else fisher, each, plan.selection.value)


def _validate_dtypes(plan: MergePlan, reader: CheckpointReader, origin: CheckpointReader | None = None) -> None:
    """Every merged tensor is floating point (`MERGE_DTYPES`): an integer or boolean expert would be
    truncated by the cast back, a complex one averaged into NaN, unseen by the finiteness check. The
    experts of a tensor share one dtype: casting them all to the first one's would merge a float32
    expert at float16 precision without a word. `origin`: the seed checkpoint a method reads."""
    for group in plan.groups:
        dtypes = {m: reader.dtype(e.key) for m, e in group.experts.items()}
        for modality, dtype in dtypes.items():
            _check_merge_dtype(reader, group.experts[modality].key, dtype, "expert tensor")
        if len(set(dtypes.values())) > 1:
            detail = ", ".join(f"{m.value} {str(d).removeprefix('torch.')}" for m, d in dtypes.items())
            raise MergeError(f"experts of {group.target} differ in dtype: {detail}; cast the checkpoint to one dtype")
        if origin is not None and group.target in origin:
            _check_merge_dtype(origin, group.target, origin.dtype(group.target), "seed checkpoint tensor")


def _check_merge_dtype(reader: CheckpointReader, key: str, dtype: torch.dtype, what: str) -> None:
    if dtype not in MERGE_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in MERGE_DTYPES)
        raise MergeError(
            f"{reader.path}: {what} {_stored_name(reader, key)} is {str(dtype).removeprefix('torch.')}; "
            f"a merge needs floating point ({allowed})"
        )


def _validate_carried_metadata(reader: CheckpointReader) -> None:
    """A tokenizer the merge would copy into its output (CARRIED_METADATA) must be one, or the merged
    checkpoint would carry it on to every later stage. (Opening the file checked that it is a JSON
    object and that `heads` is a list of names.)"""
    if "tokenizer" in reader.metadata:
        from tokenizers import Tokenizer  # imported here: only merges of checkpoints with a tokenizer need it

        try:
            Tokenizer.from_str(reader.metadata["tokenizer"])
        except Exception as error:  # tokenizers raises its own exception type
            detail = " ".join(str(error).split())
            raise CheckpointError(
                f"{reader.path}: metadata 'tokenizer' is not a serialised tokenizer ({detail}); "
                "the merge would carry it into its output"
            ) from None


def _validate_grams(plan: MergePlan, grams: GramSet) -> None:
    needed = [(g, m) for g in plan.groups if g.is_linear_weight and len(g.experts) > 1 for m in g.gram_keys().values()]
    if needed and not any(module in grams for _, module in needed):
        raise MergeError(f"Gram file {grams.path} has none of the matrices this merge needs (e.g. {needed[0][1]})")
    for group, module in needed:
        if module in grams:
            _check_statistics_dtype(grams.path, f"Gram matrix {module}", grams.reader.dtype(grams.keys[module]))
            inputs = group.shape[1]
            if tuple(grams.shape(module)) != (inputs, inputs):
                raise MergeError(
                    f"Gram matrix {module} is {list(grams.shape(module))} but {group.target} "
                    f"takes {inputs} inputs (expected [{inputs}, {inputs}])"
                )


def _check_statistics_dtype(path: Path, what: str, dtype: torch.dtype) -> None:
    """Statistics are floating point, as the merge computes with them."""
    if dtype not in MERGE_DTYPES:
        raise MergeError(f"{path}: {what} is {str(dtype).removeprefix('torch.')}, not floating point")


def _validate_gram_values(plan: MergePlan, grams: GramSet) -> None:
    """Every Gram matrix the merge will use, read once, one at a time, and checked."""
    needed = [m for g in plan.groups if g.is_linear_weight and len(g.experts) > 1 for m in g.gram_keys().values()]
    for module in dict.fromkeys(module for module in needed if module in grams):
        _check_gram(grams, module)


def _check_gram(grams: GramSet, module: str) -> None:
    """A Gram matrix X^T X is finite, symmetric and positive semi-definite, within float rounding;
    one that is all zero (no token reached its expert) is left to the method's documented fallback."""
    gram = _read_gram(grams, module)  # NaN and Inf are named by GramSet.rows
    tokens = _recorded_tokens(grams, module)
    scale = _largest_magnitude(gram)
    if scale == 0.0:
        return
    where = f"{grams.path}: Gram matrix {module}"
    if tokens == 0:
        raise MergeError(f"{where} records 0 tokens but is not zero; the file is inconsistent")
    asymmetry = _largest_asymmetry(gram)
    if asymmetry > GRAM_TOLERANCE * scale:
        raise MergeError(
            f"{where} is not symmetric (largest |G - G^T| entry {asymmetry:.3g}, largest entry {scale:.3g}); "
            "a Gram matrix X^T X always is"
        )
    eigenvalues = _eigenvalue_range_if_not_psd(gram, lambda: _read_gram(grams, module))
    if eigenvalues is not None:
        low, high = eigenvalues
        raise MergeError(
            f"{where} is not positive semi-definite: it is {_definiteness(low, high)} (eigenvalues from "
            f"{low:.3g} to {high:.3g}); a Gram matrix X^T X has no eigenvalue below zero"
        )


def _read_gram(grams: GramSet, module: str, rows: int = 256) -> torch.Tensor:
    """A Gram matrix as a float64 matrix of its own (the checks change it), read a band of rows at a
    time: the matrix and one band are all that is held."""
    shape = grams.shape(module)
    gram = torch.empty(shape, dtype=torch.float64)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        gram[start:stop] = grams.rows(module, start, stop)
    return gram


def _largest_magnitude(gram: torch.Tensor) -> float:
    """max |G| (0 for an empty matrix), without a temporary the size of G."""
    if gram.numel() == 0:
        return 0.0
    low, high = torch.aminmax(gram)
    return max(-float(low), float(high))


def _largest_asymmetry(gram: torch.Tensor, rows: int = 256) -> float:
    """max |G - G^T|, a band of rows at a time: no temporary the size of G."""
    bands = range(0, len(gram), rows)
    return max(float((gram[i : i + rows] - gram[:, i : i + rows].mT).abs_().max()) for i in bands)


def _eigenvalue_range_if_not_psd(
    gram: torch.Tensor, read_again: Callable[[], torch.Tensor]
) -> tuple[float, float] | None:
    """None when the smallest eigenvalue is >= -GRAM_TOLERANCE x the largest, else (smallest, largest).
    A Cholesky factorisation of G shifted by that tolerance (of its largest diagonal entry, which the
    largest eigenvalue is at least) settles almost every matrix at a fraction of an eigendecomposition's
    cost; eigvalsh (float64) decides the rest. `gram` is shifted and factored in place (through its
    column-major transposed view, the same symmetric matrix: no copy); where the factorisation fails,
    eigvalsh gets the matrix `read_again`."""
    largest_diagonal = float(gram.diagonal().max())
    if largest_diagonal > 0:
        gram.diagonal().add_(GRAM_TOLERANCE * largest_diagonal)
        factor, info = gram.mT, torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            return None
        gram = read_again()
    eigenvalues = torch.linalg.eigvalsh(gram)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    return None if high > 0 and low >= -GRAM_TOLERANCE * high else (low, high)


def _definiteness(low: float, high: float) -> str:
    """What a symmetric matrix that is not positive semi-definite is, from its extreme eigenvalues."""
    if high > GRAM_TOLERANCE * abs(low):
        return "indefinite"
    return "negative definite" if high < 0 else "negative semi-definite"


def _recorded_tokens(grams: GramSet, module: str) -> int | None:
    """The token count a native Gram file records for `module`; None where it records none."""
    record = grams.info.get(module)
    tokens = record.get("tokens") if isinstance(record, dict) else None
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise MergeError(f"{grams.path}: Gram matrix {module} records token count {tokens!r}, not a count")
    return tokens


def _check_statistics_source(
    reader: CheckpointReader,
    statistics: GramSet | FisherSet,
    source_sha256: Callable[[], str],
    allow_foreign: bool,
    kind: str = "Gram file",
    flag: str = "--allow-foreign-grams",
) -> list[str]:
    """Statistics must come from the source, by content: a file that records another checkpoint's hash,
    or none that can be checked (no record, a null or a string that is no SHA-256, a torch file such as
    the paper's, which has no metadata), would weigh the merge with another model's data without a word.
    Returns the warning to record when `allow_foreign` lets such a file through."""
    problem = _unverified_source(statistics, kind) or _foreign_source(reader, statistics, source_sha256, kind)
    if problem is None:
        return []
    if not allow_foreign:
        raise MergeError(f"{problem}; collect them for this checkpoint, or pass {flag}")
    return [f"{problem}; used anyway ({flag})"]


def _unverified_source(statistics: GramSet | FisherSet, kind: str) -> str | None:
    """Why the checkpoint a statistics file was collected from cannot be checked; None where it can."""
    recorded = statistics.provenance.get("checkpoint")
    sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    if isinstance(sha, str) and SHA256.fullmatch(sha):
        return None
    if statistics.path.suffix in PICKLE_SUFFIXES and not statistics.provenance:
        why = f"a {statistics.path.suffix} file records no provenance"
    elif not isinstance(recorded, dict):
        why = "its provenance records no checkpoint"
    elif sha is None:
        why = "its checkpoint record has no sha256"
    else:
        why = f"its recorded sha256 {str(sha)[:80]!r} is not a SHA-256 hash"
    return f"{kind} {statistics.path} does not say which checkpoint it was collected from ({why})"


def _foreign_source(
    reader: CheckpointReader, statistics: GramSet | FisherSet, source_sha256: Callable[[], str], kind: str
) -> str | None:
    """Why a statistics file's recorded checkpoint is not the source; None where it is."""
    recorded = statistics.provenance["checkpoint"]
    actual = source_sha256()
    if recorded["sha256"].lower() == actual:
        return None
    return (
        f"{kind} {statistics.path} was collected from checkpoint {recorded.get('path')} "
        f"(sha256 {recorded['sha256']}), not from {reader.path} (sha256 {actual})"
    )


def _read_finite(reader: CheckpointReader, key: str) -> torch.Tensor:
    tensor = reader.get(key)
    if not all_finite(tensor):
        raise MergeError(f"{reader.path}: tensor {key} contains NaN or Inf")
    return tensor


def _dtype(experts: Mapping[Any, torch.Tensor]) -> torch.dtype:
    return next(iter(experts.values())).dtype


def _input_hashes(prepared: PreparedMerge, pending: bool = False) -> dict[str, dict[str, str]]:
    """Path and content hash of every input file, so a merged checkpoint says where it came from.
    Each hash is of the file the merge has open and reads from, whatever its path names by then.
    `pending`: a placeholder of the same size, for a header written before the hashes are known."""
    inputs: dict[str, CheckpointReader | GramSet | FisherSet] = {"source": prepared.reader}
    if prepared.origin is not None:
        inputs["seed_checkpoint"] = prepared.origin
    if prepared.grams is not None:
        inputs["grams"] = prepared.grams
    if prepared.fisher is not None:
        inputs["fisher"] = prepared.fisher
    return {
        role: {"path": str(opened.path), "sha256": "0" * 64 if pending else opened.sha256()}
        for role, opened in inputs.items()
    }


def _source_config(reader: CheckpointReader) -> ModelConfig | None:
    """The source's config (stored, or read from a released file's shapes), for its family; None where
    there is none or it needs overrides (`merge_config` refuses those, naming why)."""
    try:
        return checkpoint_config(reader)
    except (CheckpointError, ConfigError):
        return None


def _provenance(
    prepared: PreparedMerge,
    inputs: dict[str, dict[str, str]],
    extra: Mapping[str, Any] | None = None,
    layout: Layout = Layout.NATIVE,
) -> dict[str, str]:
    """The merged file's metadata. Its config is the source's (stored, or read from a released file's
    shapes) made modality-agnostic; in a multiway layout, whose experts hold the merged weights tied,
    the source's multiway config as it is. Its warnings are bounded (`metadata_warnings`), so the
    header reserved before the merge always holds them."""
    config = prepared.config
    record = {
        **(extra or {}),  # the standard entries below take precedence over same-named extras
        "method": prepared.method.name,
        "options": prepared.coefficients.given if prepared.coefficients else prepared.options.model_dump(mode="json"),
        "resolved": prepared.coefficients.record() if prepared.coefficients else {},  # per spec: value -> tensors
        "prepared": prepared.prepared.model_dump(mode="json") if prepared.prepared is not None else None,
        "selection": prepared.plan.selection.value,
        "inputs": inputs,
        "warnings": metadata_warnings(prepared.warnings),
        "vlmerge_version": __version__,
    }
    metadata = {"format": "vlmerge", "merge": json.dumps(record, sort_keys=True)}
    if config is not None:
        described = config if layout is not Layout.NATIVE else config.agnostic()
        metadata["config"] = json.dumps(described.model_dump(mode="json"), sort_keys=True)
    metadata.update({key: prepared.reader.metadata[key] for key in CARRIED_METADATA if key in prepared.reader.metadata})
    if "heads" not in metadata and (heads := _released_heads(prepared.reader, config)):
        metadata["heads"] = json.dumps(heads)
    return metadata


def _released_heads(reader: CheckpointReader, config: ModelConfig | None) -> list[str]:
    """The heads a released source carries (`itm_score`, ...), to be named in the merged file's metadata
    as a native checkpoint names its own: without them the merged file would not load strictly."""
    if reader.layout is Layout.NATIVE or config is None:
        return []
    backbone = set(_backbone_keys(reader, state_shapes(config)))
    heads = [key for key in reader.keys if key not in backbone and key not in reader.mapping.unused]
    return sorted({key.split(".")[0] for key in heads})


_TENSOR_WARNING = re.compile(r"(?P<tensor>[^\s:]+): (?P<message>.+)", re.DOTALL)  # a method's `target: what`


def metadata_warnings(notes: Sequence[str], budget: int = WARNINGS_BUDGET) -> list[str]:
    """The warnings a merged file's header records: one warning repeated over many tensors as one line
    with their count and first names, each line cut at WARNING_CHARACTERS, at most `budget` header
    bytes in all, and then a line saying how many were left out. The header's room is reserved before
    the merge runs, so what the merge finds can never outgrow it once the work is done; the merge's
    result, and `vlmerge merge`, keep every warning."""
    lines = _collapse_warnings(notes)
    room = budget - _header_bytes(_left_out(len(lines), len(notes)))  # the longest such line: the most left out
    for index, line in enumerate(lines):
        room -= _header_bytes(line)
        if room < 0:
            return [*lines[:index], _left_out(len(lines) - index, len(notes))]
    return lines


def _left_out(lines: int, notes: int) -> str:
    return f"{lines} more warning lines left out of the file's metadata ({notes} warnings in all)"


def _collapse_warnings(notes: Sequence[str]) -> list[str]:
    """One line per distinct warning, in order of first appearance: a `tensor: message` repeated over
    tensors as `N tensors (a, b, c, ...): message`, any other repeated note with its count."""
    tensors: dict[str, list[str | None]] = {}
    for note in notes:
        match = _TENSOR_WARNING.fullmatch(note)
        message, tensor = (match["message"], match["tensor"]) if match else (note, None)
        tensors.setdefault(message, []).append(tensor)
    lines = []
    for message, named in tensors.items():
        examples = [name for name in named if name is not None]
        if len(named) == 1:
            line = f"{examples[0]}: {message}" if examples else message
        elif examples:
            more = ", ..." if len(examples) > WARNING_EXAMPLES else ""
            line = f"{len(named)} tensors ({', '.join(examples[:WARNING_EXAMPLES])}{more}): {message}"
        else:
            line = f"{message} ({len(named)} times)"
        lines.append(line if len(line) <= WARNING_CHARACTERS else line[: WARNING_CHARACTERS - 3] + "...")
    return lines


def _header_bytes(line: str) -> int:
    """An upper bound on the bytes one warning takes in the header: JSON in the merge record, which the
    header encodes as a JSON string again, and the separator before it."""
    return len(json.dumps(json.dumps(line))) + 2
