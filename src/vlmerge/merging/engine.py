"""The merge engine: validate -> plan -> stream -> method -> atomic write.

Every problem that names, shapes and dtypes alone reveal (an output path that is an input,
missing experts, shape or dtype mismatches, experts that are not floating point, tensors missing
from, foreign to or shaped otherwise than the model the checkpoint's config describes, a released
file whose config its shapes do not give, a seed checkpoint or statistics file that does not fit or
whose source checkpoint cannot be verified, a tokenizer that is not one) is reported before the
first tensor is read, and so is every Gram matrix the method needs that a Gram matrix cannot
be (collected from another checkpoint, not finite, symmetric or positive semi-definite); values
of the weights (NaN, Inf), and of Fisher statistics (also negative ones), are checked as tensors
stream through. Inputs are read from the files opened at the start, whatever their paths name
later. The output only appears, atomically, once the whole merge has succeeded.

This module runs the stages in order; the checks are in `checks` and `statistics_checks`, the
stream of merged tensors in `prepared_merge`, the merged file's record in `provenance`.
"""

import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmerge.core.threads import one_thread
from vlmerge.io.atomic import check_output_path
from vlmerge.io.checkpoint import (
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
from vlmerge.merging.checks import (
    check_output_layout,
    merge_config,
    refuse_foreign_layout,
    validate_carried_metadata,
    validate_dtypes,
    validate_inputs,
    validate_layout,
)
from vlmerge.merging.coefficients import parse_options
from vlmerge.merging.plan import ExpertSelection, build_merge_plan
from vlmerge.merging.prepared_merge import MergeResult, PreparedMerge, group_inputs
from vlmerge.merging.provenance import METADATA_RESERVE, input_hashes, provenance
from vlmerge.merging.registry import MERGE_METHODS, MergeWarning, Statistics
from vlmerge.merging.request import MergeRequest
from vlmerge.merging.statistics_checks import check_statistics_source, validate_gram_values

__all__ = [  # beside the merge itself, what other modules take from here
    "MergeFiles",
    "MergeRequest",
    "MergeResult",
    "PreparedMerge",
    "check_output_layout",
    "merge",
    "merge_checkpoint",
    "merge_state_dict",
    "prepare_merge",
    "write_merge",
]


def merge_checkpoint(
    source: MergeRequest | str | os.PathLike,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike,
    progress: bool = False,
    overrides: Mapping[str, Any] | None = None,
    **fields: Any,
) -> MergeResult:
    """Merge a modality-specific checkpoint file into a modality-agnostic one written to `out`.

    `source`: a `MergeRequest`, or the source's path with the request's other fields as keywords
    (`selection`, `seed_checkpoint`, `grams`, `fisher`, `layout`, `input_layout`, ...) and its
    `image_size` and `heads` also as one `overrides` mapping. `out` is checked first (not an input,
    not a directory, writable), every input is opened once and read from that open file, and a
    `.safetensors` output is streamed (header first, one merge group in memory at a time). The source
    is read in the request's `input_layout` (default: the one its keys show) and the output written
    in its `layout`, a multiway layout with tied experts.
    """
    request = MergeRequest.of(source, **{**(overrides or {}), **fields})
    check_output_path(out, request.inputs)
    prepared = MergeFiles.open(request).prepare(method, options, layout=request.layout)
    return write_merge(prepared, out, layout=request.layout, progress=progress)


@dataclass
class MergeFiles:
    """The input files of a merge request, each opened once and read from that open file (a search
    merges many candidates from one opening)."""

    request: MergeRequest
    reader: CheckpointReader
    origin: CheckpointReader | None = None
    grams: GramSet | None = None
    fisher: FisherSet | None = None

    @classmethod
    def open(cls, request: MergeRequest, reader: CheckpointReader | None = None) -> "MergeFiles":
        """`reader`: the source, where the caller has opened it already (to check it before the rest)."""
        return cls(
            request,
            reader if reader is not None else open_checkpoint(request.source, request.input_layout),
            open_checkpoint(request.seed_checkpoint) if request.seed_checkpoint is not None else None,
            open_grams(request.grams) if request.grams is not None else None,
            open_fisher(request.fisher) if request.fisher is not None else None,
        )

    def prepare(
        self, method: str, options: Mapping[str, Any] | None = None, *, layout: Layout | str | None = None
    ) -> PreparedMerge:
        """`prepare_merge` on these files, the statistics checked against the source file's hash.
        `layout`: the output's, refused here where the source's family cannot be written in it."""
        request = self.request
        return prepare_merge(
            self.reader,
            method,
            options,
            selection=request.selection,
            origin=self.origin,
            grams=self.grams,
            allow_foreign_grams=request.allow_foreign_grams,
            source_sha256=self.reader.sha256,
            fisher=self.fisher,
            allow_foreign_fisher=request.allow_foreign_fisher,
            overrides=request.overrides,
            layout=layout,
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
    refuse_foreign_layout(prepared.reader, prepared.config, layout)
    rename = _output_names(prepared, layout)
    if Path(out).suffix in PICKLE_SUFFIXES:
        tensors = dict(prepared.tensors(progress))
        result = prepared.result(tensors)
        renamed = {name: to_layout(v, squeeze) for k, v in tensors.items() for name, squeeze in rename(k)}
        result.path = save_checkpoint(out, renamed, provenance(prepared, input_hashes(prepared), record, layout))
        return result
    layout_out = [
        (name, dtype, shape[1:] if squeeze else shape)
        for k, dtype, shape in prepared.output_layout()
        for name, squeeze in rename(k)
    ]
    # The inputs are hashed beside the merge, not before it: the merge computes on one intra-op thread
    # (`one_thread`), which leaves the other cores to the hash.
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashes = hasher.submit(input_hashes, prepared)
        placeholder = provenance(prepared, input_hashes(prepared, pending=True), record, layout)
        with stream_safetensors(out, layout_out, placeholder, reserve_metadata=METADATA_RESERVE) as writer:
            for key, tensor in prepared.tensors(progress):
                for name, squeeze in rename(key):
                    writer.write(name, to_layout(tensor, squeeze))
                del tensor  # written: free before the next group is merged
            writer.update_metadata(provenance(prepared, hashes.result(), record, layout))  # the hashes and warnings
    result = prepared.result()
    result.path = Path(out)
    return result


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
    layout: Layout | str | None = None,
) -> PreparedMerge:
    """Validate and plan; run the method's pre-pass if it has one. Reads no expert tensor otherwise
    (the Gram matrices a method needs are read once here, to check them).
    `selection`: which experts are merged (all, retrieval, vqa, nlvr2). `source_sha256`: the source
    file's hash, compared with the checkpoint a Gram file records (None for an in-memory state dict,
    which has no file to compare); `allow_foreign_grams` lets a mismatch, or a file that records no
    checkable source, through with a warning. `fisher`, `allow_foreign_fisher`: the same for a method
    that merges with Fisher statistics. `overrides`: fields of the source's model config. `layout`: the
    output's, refused here (before any tensor is read) where the source's family cannot be written in it."""
    method = MERGE_METHODS.get(method_name)
    specs = parse_options(method, dict(options or {}))  # lists and dicts: coefficient specs (coefficients.py)
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys}, ExpertSelection.parse(selection))
    coefficients = specs.resolve(plan)  # every merged tensor's options, validated
    validate_carried_metadata(reader)
    config = merge_config(reader, overrides)  # the one reading of the source's config in this merge
    if layout is not None:
        refuse_foreign_layout(reader, config, layout)
    validate_layout(reader, config)
    validate_dtypes(plan, reader, origin if method.needs_origin else None)
    validate_inputs(plan, method, origin, grams, fisher, [coefficients.at(g.target) for g in plan.groups])
    notes = []
    if method.needs_grams:
        if source_sha256 is not None:
            notes = check_statistics_source(
                reader, grams, source_sha256, allow_foreign_grams, "Gram file", "--allow-foreign-grams"
            )
        validate_gram_values(plan, grams)
    if method.statistics is Statistics.FISHER and source_sha256 is not None:
        notes = check_statistics_source(
            reader, fisher, source_sha256, allow_foreign_fisher, "Fisher file", "--allow-foreign-fisher"
        )
    prepared = PreparedMerge(reader, plan, method, coefficients, config, origin, grams, fisher, warnings=notes)
    if method.prepare is not None:  # a pre-pass over every merged group, e.g. TIES' global top-k
        multi = [g for g in plan.groups if len(g.experts) > 1]
        prepass_inputs, prepass_options = coefficients.prepass(
            (group_inputs(g, reader, method, origin, grams, fisher=fisher) for g in multi), method.model_wide
        )
        with one_thread():
            prepared.prepass = method.prepare(prepass_inputs, prepass_options)
    return prepared
