"""The merge engine: validate -> plan -> stream -> method -> atomic write.

Every problem that names, shapes and dtypes alone reveal (an output path that is an input,
missing experts, shape or dtype mismatches, tensors the checkpoint's config does not describe, a
seed checkpoint or Gram file that does not fit, a tokenizer that is not one) is reported before
the first tensor is read, and so is every Gram matrix the method needs that a Gram matrix cannot
be (collected from another checkpoint, not finite, symmetric or positive semi-definite); values
of the weights (NaN, Inf), and of Fisher statistics (also negative ones), are checked as tensors
stream through. Inputs are read from the files
opened at the start, whatever their paths name later. The output only appears, atomically, once
the whole merge has succeeded.
"""

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from vlmerge.merging.plan import ExpertSelection, MergeGroup, MergePlan, build_merge_plan
from vlmerge.merging.registry import MERGE_METHODS, MergeInputs, MergeMethod, MergeWarning, Statistics
from vlmerge.models.checkpoint import head_names
from vlmerge.models.config import ModelConfig
from vlmerge.models.factory import state_keys
from vlmerge.models.families import checkpoint_config

METADATA_RESERVE = 1 << 16  # bytes kept in the header for warnings known only after the merge
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
) -> MergeResult:
    """Merge a modality-specific checkpoint file into a modality-agnostic one written to `out`.

    `out` is checked first (not an input, not a directory, writable), every input is opened
    once and read from that open file, and a `.safetensors` output is streamed (header first,
    one merge group in memory at a time). The source is read in `input_layout` (default: the one
    its keys show) and the output written in `layout`, a multiway layout with tied experts.
    """
    check_output_path(out, [source, seed_checkpoint, grams, fisher])
    files = MergeFiles.open(
        source, seed_checkpoint=seed_checkpoint, grams=grams, fisher=fisher, input_layout=input_layout
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

    @classmethod
    def open(
        cls,
        source: str | os.PathLike,
        *,
        seed_checkpoint: str | os.PathLike | None = None,
        grams: str | os.PathLike | None = None,
        fisher: str | os.PathLike | None = None,
        input_layout: Layout | str | None = None,
    ) -> "MergeFiles":
        return cls(
            open_checkpoint(source, input_layout),
            open_checkpoint(seed_checkpoint) if seed_checkpoint is not None else None,
            open_grams(grams) if grams is not None else None,
            open_fisher(fisher) if fisher is not None else None,
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
    config, _ = _source_config(reader)
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
) -> PreparedMerge:
    """Validate and plan; run the method's pre-pass if it has one. Reads no expert tensor otherwise
    (the Gram matrices a method needs are read once here, to check them).
    `selection`: which experts are merged (all, retrieval, vqa, nlvr2). `source_sha256`: the source
    file's hash, compared with the checkpoint a Gram file records (None for an in-memory state dict,
    which has no file to compare); `allow_foreign_grams` lets a mismatch through with a warning.
    `fisher`, `allow_foreign_fisher`: the same for a method that merges with Fisher statistics."""
    method = MERGE_METHODS.get(method_name)
    specs = parse_options(method, dict(options or {}))  # lists and dicts: coefficient specs (coefficients.py)
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys}, ExpertSelection.parse(selection))
    coefficients = specs.resolve(plan)  # every merged tensor's options, validated
    parsed_options = coefficients.reference
    _validate_carried_metadata(reader)
    _validate_layout(reader)
    _validate_dtypes(plan, reader)
    _validate_inputs(plan, method, origin, grams, fisher, [coefficients.at(g.target) for g in plan.groups])
    notes = []
    if method.needs_grams:
        if source_sha256 is not None:
            notes = _check_gram_source(reader, grams, source_sha256, allow_foreign_grams)
        _validate_gram_values(plan, grams)
    if method.statistics is Statistics.FISHER and source_sha256 is not None:
        notes = _check_gram_source(
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
    return PreparedMerge(reader, plan, method, parsed_options, origin, grams, prepared, notes, fisher, coefficients)


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


def _validate_layout(reader: CheckpointReader) -> None:
    """Every tensor must be one the model of the checkpoint's own config has (heads apart), or the merged
    checkpoint would not load strictly. A file without a config (the paper's) has only the plan's checks."""
    if reader.config is None:
        return
    expected = state_keys(ModelConfig.parse(reader.config, where=f"{reader.path} config"))
    heads = tuple(f"{name}." for name in head_names(reader))
    known = set(expected)
    unknown = sorted(key for key in reader.keys if key not in known and not key.startswith(heads))
    missing = [key for key in expected if key not in reader]
    if unknown:
        close = get_close_matches(unknown[0], list(expected), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        more = f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
        raise CheckpointError(
            f"{reader.path}: unknown tensor {unknown[0]!r}, not part of the model its config describes{hint}{more}"
        )
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{reader.path}: missing tensor {missing[0]!r}, which the model its config describes needs{more}"
        )


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


def _validate_dtypes(plan: MergePlan, reader: CheckpointReader) -> None:
    """The experts of a tensor share one dtype: casting them all to the first one's would merge a
    float32 expert at float16 precision without a word."""
    for group in plan.groups:
        dtypes = {m: reader.dtype(e.key) for m, e in group.experts.items()}
        if len(set(dtypes.values())) > 1:
            detail = ", ".join(f"{m.value} {str(d).removeprefix('torch.')}" for m, d in dtypes.items())
            raise MergeError(f"experts of {group.target} differ in dtype: {detail}; cast the checkpoint to one dtype")


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
            inputs = group.shape[1]
            if tuple(grams.shape(module)) != (inputs, inputs):
                raise MergeError(
                    f"Gram matrix {module} is {list(grams.shape(module))} but {group.target} "
                    f"takes {inputs} inputs (expected [{inputs}, {inputs}])"
                )


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


def _check_gram_source(
    reader: CheckpointReader,
    grams: GramSet | FisherSet,
    source_sha256: Callable[[], str],
    allow_foreign: bool,
    kind: str = "Gram file",
    flag: str = "--allow-foreign-grams",
) -> list[str]:
    """The checkpoint a native Gram (or Fisher) file says it was collected from must be the source, by
    content. Returns the warning to record when `allow_foreign` lets a foreign file through."""
    recorded = grams.provenance.get("checkpoint")
    recorded_sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    if recorded_sha is None:  # the paper's files, and native ones written without provenance
        return []
    actual = source_sha256()
    if recorded_sha == actual:
        return []
    message = (
        f"{kind} {grams.path} was collected from checkpoint {recorded.get('path')} (sha256 {recorded_sha}), "
        f"not from {reader.path} (sha256 {actual})"
    )
    if not allow_foreign:
        raise MergeError(f"{message}; collect them for this checkpoint, or pass {flag}")
    return [f"{message}; used anyway ({flag})"]


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


def _source_config(reader: CheckpointReader) -> tuple[ModelConfig | None, str | None]:
    """The source's config (stored, or read from a released file's shapes), or why there is none."""
    try:
        return checkpoint_config(reader), None
    except (CheckpointError, ConfigError) as error:
        return None, f"the merged file carries no model config: {error}"


def _provenance(
    prepared: PreparedMerge,
    inputs: dict[str, dict[str, str]],
    extra: Mapping[str, Any] | None = None,
    layout: Layout = Layout.NATIVE,
) -> dict[str, str]:
    """The merged file's metadata. Its config is the source's (stored, or read from a released file's
    shapes) made modality-agnostic; in a multiway layout, whose experts hold the merged weights tied,
    the source's multiway config as it is."""
    config, note = _source_config(prepared.reader)
    record = {
        **(extra or {}),  # the standard entries below take precedence over same-named extras
        "method": prepared.method.name,
        "options": prepared.coefficients.given if prepared.coefficients else prepared.options.model_dump(mode="json"),
        "resolved": prepared.coefficients.record() if prepared.coefficients else {},  # per spec: value -> tensors
        "prepared": prepared.prepared.model_dump(mode="json") if prepared.prepared is not None else None,
        "selection": prepared.plan.selection.value,
        "inputs": inputs,
        "warnings": prepared.warnings + ([note] if note else []),
        "vlmerge_version": __version__,
    }
    metadata = {"format": "vlmerge", "merge": json.dumps(record, sort_keys=True)}
    if config is not None:
        described = config if layout is not Layout.NATIVE else config.agnostic()
        metadata["config"] = json.dumps(described.model_dump(mode="json"), sort_keys=True)
    metadata.update({key: prepared.reader.metadata[key] for key in CARRIED_METADATA if key in prepared.reader.metadata})
    return metadata
