"""A safetensors file read with explicit reads from one open handle instead of a memory map.

Each tensor's bytes are read into a buffer of its own when it is asked for. With a memory
map, every page a streamed merge touched would stay resident and count against the
process, so peak memory would grow to the whole file; here it stays near one merge group.
Buffers of mid-sized tensors are used again once their tensor is gone (`ReadBuffers`).
The file is opened once (`InputFile`): a path replaced while a merge streams does not mix two
files, and `sha256()` hashes the file the tensors came from.

The header is checked in full when the file is opened, so a corrupt or truncated file fails
there, by name, rather than on the last tensor of a long merge. The checks are the safetensors
library's (tests/io/test_io_hardening.py runs the same malformed files through both): the header
is UTF-8 JSON (no NaN literals, no lone surrogates), an object whose `__metadata__` maps strings
to strings; every tensor has a known dtype, a shape of non-negative integers and exactly the
bytes dtype x shape needs; the data regions are contiguous, do not overlap and cover the rest
of the file exactly. vlmerge is stricter in two places: a key given twice in the header is
refused (the library keeps the last one), since two readers could disagree on which one counts;
and only the dtypes of `DTYPES` are read (the library knows a few more, e.g. U16, F8_E4M3).
"""

import json
import math
import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmerge.core.errors import CheckpointError
from vlmerge.io.input_file import FileIdentity, InputFile

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
MAX_HEADER_BYTES = 100_000_000  # the format's own limit (the library's MAX_HEADER_SIZE)
POOLED_BYTES = (1 << 16, 1 << 25)  # tensors of 64 KiB to 32 MiB are read into buffers used again
IDLE_BUFFERS = 3  # at most this many wait for their next tensor, per open file (a group's experts)
_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # not shared with a forked child
_U64 = 2**64  # shapes and offsets are u64 in the format; the library refuses larger values


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class _HeaderError(Exception):
    """Raised inside the JSON parser's hooks; becomes a CheckpointError naming the file."""


class SafetensorsFile:
    """Header parsed and checked on open; `read(key)` returns a tensor that owns its memory.

    Holds the file open until `close()` (or a `with` block ends, or the object is collected).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = InputFile(self.path)
        self._buffers = ReadBuffers()
        try:
            header, data_start = _read_header(self._file)
            self.metadata = _metadata(header.pop("__metadata__", None), self.path)
            self.entries = {key: _entry(key, value, data_start, self.path) for key, value in header.items()}
            _check_layout(self.entries, data_start, self._file.size, self.path)
        except BaseException:
            self._file.close()
            raise

    @property
    def identity(self) -> FileIdentity:
        """(st_dev, st_ino, st_size, st_mtime_ns) of the file when it was opened."""
        return self._file.identity

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        return self._read_at(key, entry.start, entry.shape, entry.dtype, entry.end - entry.start)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of tensor `key` (along its first dimension), reading only their bytes:
        a method can stream a large matrix a band at a time (RegMean's Gram matrices)."""
        entry = self.entries[key]
        if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} of shape {list(entry.shape)} has no rows {start}:{stop}"
            )
        row_bytes = (entry.end - entry.start) // entry.shape[0] if entry.shape[0] else 0
        shape = (stop - start, *entry.shape[1:])
        return self._read_at(key, entry.start + start * row_bytes, shape, entry.dtype, (stop - start) * row_bytes)

    def _read_at(self, key: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        tensor = self._buffers.empty(shape, dtype, nbytes)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            self._file.readinto(offset, buffer)
        except CheckpointError as error:
            raise CheckpointError(f"{error} while reading tensor {key!r}") from None
        return tensor

    def sha256(self) -> str:
        """SHA-256 of the open file: the bytes the tensors are read from, whatever the path names now."""
        return self._file.sha256()

    def check_unchanged(self) -> None:
        """A named CheckpointError if the path now names another file or the file was rewritten."""
        self._file.check_unchanged()

    def close(self) -> None:
        self._file.close()
        self._buffers.clear()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ReadBuffers:
    """Buffers for the tensors read from one file, each used again once its tensor is gone.

    A streamed merge reads hundreds of MB as tensors of a few sizes, each dropped a moment later.
    A fresh buffer per tensor costs a page fault per 4 KiB on its first write, and pays it again for
    every tensor (the allocator hands large freed blocks back to the system): a fifth of a
    base-size interpolation's time. Here a tensor is made over a numpy view of a pooled buffer; the
    tensor and every view of it hold that view, and once the last of them is gone the buffer comes
    back. Every buffer can hold any pooled tensor (tensors of `POOLED_BYTES`): its own anonymous
    mapping, of which only the pages a tensor has written are resident, so a pool of a few buffers
    costs a few of the file's larger tensors whatever their sizes, and stays out of the allocator's
    heap. At most `idle_buffers` wait for their next tensor.
    """

    def __init__(self, idle_buffers: int = IDLE_BUFFERS) -> None:
        self._idle: list[np.ndarray] = []
        self._idle_limit = idle_buffers
        self._open = True
        self._lock = threading.RLock()  # a buffer comes back in whichever thread drops its last tensor

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` (`nbytes` in all) that owns its memory."""
        if not POOLED_BYTES[0] <= nbytes <= POOLED_BYTES[1]:
            return torch.empty(shape, dtype=dtype)
        buffer = self._take()
        lease = buffer[:nbytes]  # alive exactly as long as the tensor's storage
        weakref.finalize(lease, self._give_back, buffer).atexit = False
        return torch.from_numpy(lease).view(dtype).view(shape)

    def clear(self) -> None:
        """Let every idle buffer go, and those still in use once their tensors are gone."""
        with self._lock:
            self._open = False
            self._idle.clear()

    def _take(self) -> np.ndarray:
        with self._lock:
            if self._idle:
                return self._idle.pop()  # the last one back: its pages are resident
        return np.frombuffer(mmap.mmap(-1, POOLED_BYTES[1], **_PRIVATE), dtype=np.uint8)

    def _give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            if self._open and len(self._idle) < self._idle_limit:
                self._idle.append(buffer)


def _invalid(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({problem})")


def _read_header(file: InputFile) -> tuple[dict, int]:
    if file.size < 8:
        raise _invalid(file.path, "shorter than its 8-byte header length")
    length = int.from_bytes(file.read(0, 8), "little")
    if length > MAX_HEADER_BYTES:
        raise _invalid(file.path, f"header length {length} is over the format's limit of {MAX_HEADER_BYTES}")
    if length > file.size - 8:
        raise _invalid(file.path, f"header length {length} exceeds the file; it may be corrupt or truncated")
    try:
        header = json.loads(
            file.read(8, length).decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise _invalid(file.path, "header is not UTF-8; it may be corrupt") from None
    except json.JSONDecodeError as error:
        raise _invalid(file.path, f"header is not JSON: {error}; it may be corrupt") from None
    except RecursionError:
        raise _invalid(file.path, "header JSON is nested too deeply") from None
    except _HeaderError as error:
        raise _invalid(file.path, str(error)) from None
    if not isinstance(header, dict):
        raise _invalid(file.path, "header is not a JSON object")
    return header, 8 + length


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _HeaderError(f"header has the key {duplicate!r} twice")
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _HeaderError(f"header string {ascii(text)[:60]} is not valid Unicode") from None
    return result


def _no_constant(name: str) -> None:
    raise _HeaderError(f"header holds {name}, which is not JSON")


def _metadata(value: object, path: Path) -> dict[str, str]:
    if value is None:  # the library reads `"__metadata__": null` as no metadata
        return {}
    if not isinstance(value, dict):
        raise _invalid(path, f"__metadata__ is {_json_type(value)}, not an object of strings")
    bad = next((key for key, text in value.items() if not isinstance(text, str)), None)
    if bad is not None:
        raise _invalid(path, f"__metadata__ value {bad!r} is {_json_type(value[bad])}, not a string")
    return value


def _entry(key: str, value: object, data_start: int, path: Path) -> TensorEntry:
    if not isinstance(value, dict):
        raise _invalid(path, f"tensor {key!r} is described by {_json_type(value)}, not an object")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in value]
    if missing:
        raise _invalid(path, f"tensor {key!r} has no {missing[0]!r}")
    name, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(name, str) or name not in DTYPES:
        raise _invalid(path, f"tensor {key!r} has dtype {name!r}; vlmerge reads {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_u64(n) for n in shape)):
        raise _invalid(path, f"tensor {key!r} has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(n) for n in offsets)):
        raise _invalid(path, f"tensor {key!r} has data_offsets {offsets!r}; expected [start, end]")
    dtype, (start, end) = DTYPES[name], offsets
    numel = 1
    for n in shape:  # in order, as the library multiplies: an overflow on the way is refused too
        numel *= n
        if numel >= _U64:
            raise _invalid(path, f"tensor {key!r} has shape {shape} with more than 2**64 elements")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end < start or end - start != expected:
        raise _invalid(
            path, f"tensor {key!r} has offsets {[start, end]} for {expected} bytes of {name} {shape}; it may be corrupt"
        )
    return TensorEntry(dtype, tuple(shape), data_start + start, data_start + end)


def _check_layout(entries: dict[str, TensorEntry], data_start: int, size: int, path: Path) -> None:
    """The data regions, in order, must follow each other from the start of the data to the file's end."""
    position = data_start
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            problem = "overlaps the tensor before it" if entry.start < position else "leaves a gap before it"
            raise _invalid(
                path, f"tensor {key!r} at data offsets {[entry.start - data_start, entry.end - data_start]} {problem}"
            )
        position = entry.end
    if size < position:
        raise _invalid(path, f"truncated ({size} bytes, its header promises {position})")
    if size > position:
        raise _invalid(path, f"{size - position} trailing bytes after the last tensor")


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
