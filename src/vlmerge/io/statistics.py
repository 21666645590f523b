"""Fisher statistics files: per expert tensor, the diagonal of its empirical Fisher, for Fisher merging.

A file is a safetensors keyed by each expert tensor's own key (`blocks.3.attn.v.qkv.weight`), each
entry of the weight's shape, stored in float32 (the merge weighs in float64; seven digits of a
weighting are plenty, and a file of float64 would be twice the checkpoint's size). Its metadata
says it is one (`format`), records per tensor the modality and how many batches reached it
(`fisher`), and where it came from (`provenance`: the checkpoint's and the data's hashes, the batches),
as Gram files do, so a merge can refuse one collected from another checkpoint.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmerge.core.errors import CheckpointError
from vlmerge.core.numerics import all_finite
from vlmerge.io.checkpoint import (
    CheckpointReader,
    ReaderBacked,
    check_floating,
    open_checkpoint,
    parse_json_metadata,
    save_checkpoint,
)

FISHER_FORMAT = "vlmerge-fisher"


@dataclass
class FisherSet(ReaderBacked):
    """Diagonal Fisher statistics by expert tensor key, read lazily from one file."""

    reader: CheckpointReader
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return self.reader.keys

    def __contains__(self, key: object) -> bool:
        return key in self.reader

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(key)

    def get(self, key: str) -> torch.Tensor:
        """The statistics of one expert tensor, checked: a Fisher is finite and never negative."""
        fisher = self.reader.get(key)
        if not all_finite(fisher):
            raise CheckpointError(f"{self.path}: Fisher statistics {key} contain NaN or Inf")
        if bool((fisher < 0).any()):
            raise CheckpointError(
                f"{self.path}: Fisher statistics {key} have negative entries (smallest {float(fisher.min()):.3g}); "
                "a mean of squared gradients never has"
            )
        return fisher


def open_fisher(path: str | os.PathLike) -> FisherSet:
    """Open a Fisher file; one that does not say it is one (a checkpoint, a Gram file) is refused by name."""
    reader = open_checkpoint(path)
    found = reader.metadata.get("format")
    if found != FISHER_FORMAT:
        reader.close()
        raise CheckpointError(
            f"{path}: not a Fisher statistics file (metadata format {found!r}, expected {FISHER_FORMAT!r}); "
            "collect one with `vlmerge fisher`"
        )
    check_floating(reader, "Fisher statistics {} are")
    info = parse_json_metadata(reader.metadata, "fisher", path) if "fisher" in reader.metadata else {}
    if not isinstance(info, dict) or not all(isinstance(entry, dict) for entry in info.values()):
        reader.close()
        raise CheckpointError(f"{path}: metadata 'fisher' is not an object of per-tensor objects")
    return FisherSet(reader, info, reader.metadata_json("provenance", {}))


def save_fisher(
    path: str | os.PathLike,
    fisher: Mapping[str, torch.Tensor],
    info: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
) -> Path:
    """Write Fisher statistics (float32) with their per-tensor records and provenance, atomically."""
    metadata = {
        "format": FISHER_FORMAT,
        "fisher": json.dumps(info, sort_keys=True),
        "provenance": json.dumps(provenance, sort_keys=True),
    }
    return save_checkpoint(path, {k: f.to(torch.float32) for k, f in fisher.items()}, metadata)
