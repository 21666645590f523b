"""Gram files: per expert linear layer, the sum of X^T X over the inputs it saw.

Native files are safetensors keyed by the module whose input the matrix describes
(`blocks.3.attn.v.qkv`, `blocks.3.mlp.l.fc1`, ...), with metadata recording per matrix the
modality and token count, and hashes of the checkpoint and data they came from, so they can
be shared and reused without the data. The paper's `.pth` Gram files (keyed
`transformer.blocks.3.attn.v` for qkv) are read too: it saved a pickled `collections.defaultdict`,
which `open_checkpoint` reads as a plain dict without calling its default factory (`safe_pickle`).
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
from vlmerge.io.checkpoint import CheckpointReader, ReaderBacked, check_floating, open_checkpoint, save_checkpoint
from vlmerge.io.layout import native_gram_key


@dataclass
class GramSet(ReaderBacked):
    """Gram matrices by native module path, read lazily from one file."""

    reader: CheckpointReader
    keys: dict[str, str]  # native module path -> key in the reader
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __contains__(self, module: object) -> bool:
        return module in self.keys

    def shape(self, module: str) -> tuple[int, ...]:
        return self.reader.shape(self.keys[module])

    def get(self, module: str) -> torch.Tensor:
        gram = self.reader.get(self.keys[module])
        if not all_finite(gram):
            raise CheckpointError(f"{self.path}: Gram matrix {module} contains NaN or Inf")
        return gram

    def rows(self, module: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a Gram matrix, read alone where the file allows (a band of a large one)."""
        band = self.reader.get_rows(self.keys[module], start, stop)
        if not all_finite(band):
            raise CheckpointError(f"{self.path}: Gram matrix {module} contains NaN or Inf")
        return band


def open_grams(path: str | os.PathLike) -> GramSet:
    """Open a Gram file; its `grams` and `provenance` metadata must be JSON objects (checked here)."""
    reader = open_checkpoint(path)
    keys = {native_gram_key(key, reader.layout): key for key in reader.keys}
    bad = [k for k in reader.keys if len(reader.shape(k)) != 2 or reader.shape(k)[0] != reader.shape(k)[1]]
    if bad:
        reader.close()
        raise CheckpointError(
            f"{path}: not a Gram file: {bad[0]} has shape {list(reader.shape(bad[0]))}, expected square"
        )
    check_floating(reader, "Gram matrix {} is")
    info = reader.metadata_json("grams", {})
    provenance = reader.metadata_json("provenance", {})
    return GramSet(reader, keys, info, provenance)


def save_grams(
    path: str | os.PathLike,
    grams: Mapping[str, torch.Tensor],
    info: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
) -> Path:
    """Write Gram matrices (float64) with per-matrix modality/token counts and their provenance."""
    metadata = {
        "format": "vlmerge-grams",
        "grams": json.dumps(info, sort_keys=True),
        "provenance": json.dumps(provenance, sort_keys=True),
    }
    return save_checkpoint(path, {k: g.to(torch.float64) for k, g in grams.items()}, metadata)
