"""A safetensors file read with explicit reads instead of a memory map.

Each tensor's bytes are read into a buffer of its own when it is asked for. With a memory
map, every page a streamed merge touched would stay resident and count against the
process, so peak memory would grow to the whole file; here it stays near one merge group.
The header is checked in full when the file is opened, so a corrupt or truncated file fails
there, by name, rather than on the last tensor of a long merge.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmerge.core.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """Header parsed and checked on open; `read(key)` returns a tensor that owns its memory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header, data_start = _read_header(handle, size, self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries = {key: _entry(key, value, data_start, self.path) for key, value in header.items()}
        end = max((entry.end for entry in self.entries.values()), default=data_start)
        if size < end:
            raise CheckpointError(
                f"{self.path}: not a readable safetensors file: truncated ({size} bytes, its header promises {end})"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(entry.start)
            filled = 0
            while filled < len(buffer):
                count = handle.readinto(buffer[filled:])
                if not count:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {key!r}")
                filled += count
        return tensor


def _read_header(handle, size: int, path: Path) -> tuple[dict, int]:
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: not a readable safetensors file (shorter than its 8-byte header length)")
    length = int.from_bytes(prefix, "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(
            f"{path}: not a readable safetensors file (header length {length} exceeds the file); "
            "it may be corrupt or truncated"
        )
    try:
        header = json.loads(handle.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (header is not JSON: {error}); it may be corrupt"
        ) from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    return header, 8 + length


def _entry(key: str, value: object, data_start: int, path: Path) -> TensorEntry:
    try:
        dtype, shape, (start, end) = (
            DTYPES[value["dtype"]],
            tuple(int(n) for n in value["shape"]),
            value["data_offsets"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (bad header entry for {key!r}: {error})"
        ) from None
    expected = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end and end - start == expected):
        raise CheckpointError(
            f"{path}: not a readable safetensors file (tensor {key!r} has offsets {[start, end]} "
            f"for {expected} bytes); it may be corrupt"
        )
    return TensorEntry(dtype, shape, data_start + start, data_start + end)
