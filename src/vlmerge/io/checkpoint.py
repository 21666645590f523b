"""Checkpoints: safetensors with self-describing metadata, read a tensor at a time, written atomically.

Foreign `.pt/.pth/.ckpt/.bin` files are read with `torch.load(weights_only=True)` only, so a
file that needs code to unpickle is refused instead of executed.
"""

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmerge.core.errors import CheckpointError
from vlmerge.io.atomic import atomic_path
from vlmerge.io.layout import Layout, from_reference_key, is_reference_layout, rename_keys
from vlmerge.io.safetensors_file import SafetensorsFile

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# Metadata a merge keeps from its input: it describes the weights (heads, tokenizer), not the merge.
CARRIED_METADATA = ("heads", "tokenizer")


class CheckpointReader:
    """Tensors of one checkpoint under native key names, read one at a time on request."""

    def __init__(
        self,
        path: Path,
        layout: Layout,
        keys: dict[str, str],
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype],
        metadata: dict[str, str],
        fetch,
    ) -> None:
        self.path = path
        self.layout = layout
        self._stored_key = keys  # native key -> key as stored in the file
        self._shapes = shapes
        self._dtypes = dtypes
        self.metadata = metadata
        self._fetch = fetch

    @property
    def keys(self) -> list[str]:
        return list(self._stored_key)

    def __contains__(self, key: object) -> bool:
        return key in self._stored_key

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def numel(self, key: str) -> int:
        return int(torch.Size(self._shapes[key]).numel())

    def get(self, key: str) -> torch.Tensor:
        if key not in self._stored_key:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        try:
            return self._fetch(self._stored_key[key])
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"{self.path}: cannot read tensor {key!r} ({error}); the file is corrupt or truncated"
            ) from error

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: self.get(key) for key in self.keys}

    @property
    def config(self) -> dict[str, Any] | None:
        """The model config stored with the weights, if this checkpoint carries one."""
        raw = self.metadata.get("config")
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{self.path}: metadata 'config' is not valid JSON ({error})") from error

    @property
    def step(self) -> int | None:
        return int(self.metadata["step"]) if "step" in self.metadata else None


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a safetensors or weights-only torch checkpoint in native or the paper's layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix in PICKLE_SUFFIXES:
        return _open_torch(path)
    return _open_safetensors(path)


def _open_safetensors(path: Path) -> CheckpointReader:
    try:
        file = SafetensorsFile(path)
    except OSError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    return _reader(
        path,
        file.keys(),
        {k: e.shape for k, e in file.entries.items()},
        {k: e.dtype for k, e in file.entries.items()},
        file.metadata,
        file.read,
    )


def _open_torch(path: Path) -> CheckpointReader:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: the file is a pickle that needs code to load; vlmerge never unpickles code "
            "(torch.load weights_only=True). Re-save it as a plain state dict or as safetensors."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path}: expected a state dict (or a dict with 'state_dict'), found {type(loaded).__name__}"
        )
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(set(state) - set(tensors))
    if skipped:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {skipped[:5]}")
    return reader_from_state_dict(tensors, str(path))


def reader_from_state_dict(state: Mapping[str, torch.Tensor], name: str = "<memory>") -> CheckpointReader:
    """Serve an in-memory state dict through the same interface as a file."""
    tensors = dict(state)
    return _reader(
        Path(name),
        list(tensors),
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        {},
        tensors.__getitem__,
    )


def _reader(path, stored_keys, shapes, dtypes, metadata, fetch) -> CheckpointReader:
    layout = Layout.REFERENCE if is_reference_layout(stored_keys) else Layout.NATIVE
    rename = from_reference_key if layout is Layout.REFERENCE else (lambda k: k)
    to_native = rename_keys(stored_keys, rename)
    native_to_stored = {native: stored for stored, native in to_native.items()}
    return CheckpointReader(
        path,
        layout,
        native_to_stored,
        {to_native[k]: s for k, s in shapes.items()},
        {to_native[k]: d for k, d in dtypes.items()},
        metadata,
        fetch,
    )


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors atomically: safetensors for `.safetensors`, a plain state dict otherwise."""
    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)] if metadata else []
    if bad:
        raise CheckpointError(f"metadata values must be strings: {bad}")
    with atomic_path(path) as tmp:
        if path.suffix in PICKLE_SUFFIXES:
            torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
        else:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    return path


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
