"""Write a safetensors file one tensor at a time.

The merge plan knows every output tensor's name, dtype and shape before any is computed,
so the header can be written first and tensors appended as they are produced: peak memory
stays near one merge group instead of the whole checkpoint. The file appears atomically.
The header's keys (tensor names, metadata keys) are written sorted, so the same tensors and
metadata give the same bytes in every process.

The file is made durable (fsync) before it is renamed into place. So that the fsync does not wait
for the whole file at the end, the disk is asked to start writing every `WRITEBACK_BYTES` as the
tensors stream (Linux: `posix_fadvise(DONTNEED)` starts writeback without waiting for it); the
merge computes while the disk writes, and the fsync finds only the tail left (a fifth of a
base-size interpolation's time otherwise).
"""

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from vlmerge.core.errors import CheckpointError
from vlmerge.io.atomic import atomic_path
from vlmerge.io.safetensors_file import DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # torch dtype -> the format's name
WRITEBACK_BYTES = 1 << 25  # ask the disk to start writing after every 32 MiB of tensor data


class TensorStreamWriter:
    """Appends tensors in the order the header promised, checking each against it."""

    def __init__(
        self, handle, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], header: dict, header_bytes: int
    ) -> None:
        self._handle = handle
        self._pending = iter(layout)
        self._header = header
        self._header_bytes = header_bytes
        self._handed_to_disk = 0  # bytes before this offset were passed to writeback

    def update_metadata(self, metadata: Mapping[str, str]) -> None:
        """Rewrite the metadata in place (e.g. warnings known only at the end), within the reserved space."""
        _check_metadata(metadata)
        encoded = _encode_header({**self._header, "__metadata__": dict(metadata)}, 0)
        if len(encoded) > self._header_bytes:
            raise CheckpointError(
                f"final metadata needs {len(encoded)} header bytes, only {self._header_bytes} reserved"
            )
        position = self._handle.tell()
        self._handle.seek(8)
        self._handle.write(encoded + b" " * (self._header_bytes - len(encoded)))
        self._handle.seek(position)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self._pending, None)
        if expected is None or expected[0] != name:
            raise CheckpointError(
                f"stream order: got {name!r}, header expects {expected[0] if expected else 'nothing'!r}"
            )
        _, dtype, shape = expected
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{name}: got {tensor.dtype} {list(tensor.shape)}, header promised {dtype} {list(shape)}"
            )
        self._handle.write(memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        if self._handle.tell() - self._handed_to_disk >= WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start writing what is written so far to the disk, without waiting for it (see the module doc);
        a no-op where the system has no posix_fadvise. The pages stay cached while they are written."""
        if not hasattr(os, "posix_fadvise"):
            return
        self._handle.flush()
        end = self._handle.tell()
        os.posix_fadvise(
            self._handle.fileno(), self._handed_to_disk, end - self._handed_to_disk, os.POSIX_FADV_DONTNEED
        )
        self._handed_to_disk = end

    def finish(self) -> None:
        missing = next(self._pending, None)
        if missing is not None:
            raise CheckpointError(f"stream ended before tensor {missing[0]!r} was written")


@contextmanager
def stream_safetensors(
    path: str | os.PathLike,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
    reserve_metadata: int = 0,
) -> Iterator[TensorStreamWriter]:
    """Yield a writer for the tensors of `layout` (name, dtype, shape), in that order.

    `reserve_metadata` extra header bytes (blank JSON whitespace) let `update_metadata` grow it later.
    """
    _check_metadata(metadata or {})
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        if name in header or name == "__metadata__":
            raise CheckpointError(f"{path}: tensor name {name!r} given twice or reserved by the format")
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype}; safetensors outputs hold {', '.join(DTYPES)}")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = {k: v for k, v in header.items() if k != "__metadata__"}
    encoded = _encode_header(header, reserve_metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            writer = TensorStreamWriter(handle, layout, body, len(encoded))
            yield writer
            writer.finish()


def _check_metadata(metadata: Mapping[str, str]) -> None:
    bad = sorted(str(key) for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str))
    if bad:
        raise CheckpointError(f"safetensors metadata keys and values must be strings: {bad[:5]}")


def _encode_header(header: dict, reserve: int) -> bytes:
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b" " * reserve
    return encoded + b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
