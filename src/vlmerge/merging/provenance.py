"""The merge record a merged file's metadata carries: how it was made, from which files (by content
hash), its config, and the merge's warnings bounded to the header room reserved before the merge."""

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vlmerge import __version__
from vlmerge.io.checkpoint import CARRIED_METADATA, CheckpointReader
from vlmerge.io.grams import GramSet
from vlmerge.io.layout import Layout
from vlmerge.io.statistics import FisherSet
from vlmerge.merging.checks import backbone_keys
from vlmerge.models.config import ModelConfig
from vlmerge.models.factory import state_shapes

if TYPE_CHECKING:  # the merge imports this module to write its record
    from vlmerge.merging.prepared_merge import PreparedMerge

METADATA_RESERVE = 1 << 16  # bytes kept in the header for warnings known only after the merge
WARNINGS_BUDGET = METADATA_RESERVE // 2  # the most header bytes the recorded warnings take: never outgrows the reserve
WARNING_CHARACTERS = 1000  # a recorded warning line longer than this is cut
WARNING_EXAMPLES = 3  # tensors named in a line that stands for one warning repeated over many


def input_hashes(prepared: "PreparedMerge", pending: bool = False) -> dict[str, dict[str, str]]:
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


def provenance(
    prepared: "PreparedMerge",
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
        "options": prepared.coefficients.given,
        "resolved": prepared.coefficients.record(),  # per spec: value -> tensors
        "prepared": prepared.prepass.model_dump(mode="json") if prepared.prepass is not None else None,
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
    backbone = set(backbone_keys(reader, state_shapes(config)))
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
