"""Torch files checked before `torch.load` reads them, and the tensors it returns checked after.

`torch.load(weights_only=True)` runs no code from a file, but it trusts the file's sizes: it
inflates a compressed zip record whole, allocates a legacy storage of the size the pickle
declares, and builds a tensor of any shape and strides over a storage, so a 1 KB file can read
as a 20000 x 20000 tensor (stride 0). Before it runs, `check_torch_file` requires a zip archive
whose records are stored uncompressed, inside the file, read alike by Python's `zipfile` and
torch's own reader, with storages of exactly their record's size, or a legacy file whose
storages fit the bytes after its pickles; every pickle is walked first (`pickle_scan`). After,
`check_tensors` admits only dense CPU tensors of the dtypes vlmerge reads, each element its own
bytes in its storage, and no more tensor bytes than `MAX_EXPANSION` times the file (tied
weights share a storage under several names).
"""

import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping

import torch

from vlmerge.core.errors import CheckpointError
from vlmerge.io.input_file import InputFile
from vlmerge.io.pickle_scan import PickleRefused, ScanResult, scan_pickle
from vlmerge.io.safetensors_file import DTYPES

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the first pickle of every legacy torch.save file
LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, its storage keys
MAX_EXPANSION = 8  # tensor bytes per file byte; tied experts view one storage under two or three names
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local header: signature, ..., name and extra lengths


def check_torch_file(file: InputFile) -> None:
    """One named error for a torch file that `torch.load` could crash on, or that reads as more than it holds."""
    try:
        head = file.read(0, min(file.size, len(ZIP_MAGIC)))
        if head == ZIP_MAGIC:
            _check_zip(file)
        elif head[:1] == pickle.PROTO:
            _check_legacy(file)
        else:
            raise PickleRefused("neither a torch.save zip archive nor a pickle")
    except PickleRefused as refused:
        raise CheckpointError(f"{file.path}: not a torch file vlmerge reads: {refused}") from None


def _check_zip(file: InputFile) -> None:
    records = _zip_records(file)
    _check_torch_reads_alike(file, records)
    prefix = next(iter(records)).partition("/")[0] + "/"
    if prefix + "data.pkl" not in records:
        raise PickleRefused("a zip archive without the data.pkl record torch.save writes")
    offset, size = records[prefix + "data.pkl"]
    result = ScanResult()
    scan_pickle(io.BytesIO(file.read(offset, size)), size, result)
    for key, nbytes in result.storages.items():
        _, stored = records.get(f"{prefix}data/{key}", (0, None))
        if stored != nbytes:
            found = "no record" if stored is None else f"a record of {stored} bytes"
            raise PickleRefused(f"storage {key!r} declares {nbytes} bytes but the archive has {found} for it")


def _zip_records(file: InputFile) -> dict[str, tuple[int, int]]:
    """Record name -> (offset of its data, size), in the archive's order; every record stored as is."""
    with os.fdopen(os.dup(file.fileno()), "rb") as handle:
        try:
            handle.seek(0)
            infos = zipfile.ZipFile(handle).infolist()
        except Exception as error:  # zipfile raises many types on a hostile directory; each is one line
            raise PickleRefused(f"a damaged zip archive ({_first_line(error)})") from None
    if not infos:
        raise PickleRefused("an empty zip archive")
    records: dict[str, tuple[int, int]] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size or info.flag_bits & 1:
            raise PickleRefused(
                f"record {info.filename!r} is compressed or encrypted ({info.compress_size} bytes that unpack to "
                f"{info.file_size}); torch.save stores records as they are"
            )
        if info.filename in records:
            raise PickleRefused(f"record {info.filename!r} appears twice")
        records[info.filename] = (_data_offset(file, info), info.file_size)
    _check_apart(infos, records, file.size)
    return records


def _check_apart(infos: list[zipfile.ZipInfo], records: dict[str, tuple[int, int]], file_size: int) -> None:
    """Each record's bytes its own, inside the file: records sharing bytes would load them once per name."""
    end = 0
    for info in sorted(infos, key=lambda info: info.header_offset):
        offset, size = records[info.filename]
        if info.header_offset < end:
            raise PickleRefused(f"record {info.filename!r} overlaps the record before it")
        end = offset + size
        if end > file_size:
            raise PickleRefused(f"record {info.filename!r} runs past the end of the file")


def _data_offset(file: InputFile, info: zipfile.ZipInfo) -> int:
    """Where a record's data starts: after its local header, whose name and extra field vary in length."""
    if info.header_offset + _LOCAL_HEADER.size > file.size:
        raise PickleRefused(f"record {info.filename!r} has no local header")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(info.header_offset, _LOCAL_HEADER.size))
    if signature != ZIP_MAGIC:
        raise PickleRefused(f"record {info.filename!r} has no local header")
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _check_torch_reads_alike(file: InputFile, records: dict[str, tuple[int, int]]) -> None:
    """torch's zip reader must see the records checked here: an archive two readers read differently could
    show one of them stored records and the other a compressed one."""
    with os.fdopen(os.dup(file.fileno()), "rb") as handle:
        try:
            handle.seek(0)  # a duplicate descriptor shares the position another reader left
            reader = torch._C.PyTorchFileReader(handle)
            prefix = next(iter(records)).partition("/")[0] + "/"
            seen = {
                prefix + name: (reader.get_record_offset(name), reader.get_record_size(name))
                for name in reader.get_all_records()
            }
        except Exception as error:  # torch's reader raises RuntimeError, and more on a hostile directory
            raise PickleRefused(f"a zip archive torch cannot read ({_first_line(error)})") from None
    if seen != records:
        raise PickleRefused("a zip archive whose directory torch and Python read differently")


def _check_legacy(file: InputFile) -> None:
    """torch's format before 1.6: pickles, then each storage's element count and bytes."""
    result = ScanResult()
    with os.fdopen(os.dup(file.fileno()), "rb") as handle:
        handle.seek(0)
        magic = scan_pickle(handle, file.size, result)
        if magic != LEGACY_MAGIC_NUMBER:
            raise PickleRefused(
                "a plain pickle, not a torch.save file; save the tensors with torch.save or as safetensors"
            )
        for _ in range(LEGACY_PICKLES - 1):
            scan_pickle(handle, file.size - handle.tell(), result)
        left = file.size - handle.tell()
    needed = sum(8 + nbytes for nbytes in result.storages.values())  # 8: each storage's element count
    if needed > left:
        raise PickleRefused(f"its storages declare {needed} bytes where {left} follow its pickles (truncated?)")


def check_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, file_size: int) -> None:
    """Every tensor dense, on the CPU, of a dtype vlmerge reads and made of its own storage bytes; their
    bytes in proportion to the file's."""
    total = 0
    for key, tensor in tensors.items():
        problem = _tensor_problem(tensor)
        if problem is not None:
            raise CheckpointError(f"{path}: tensor {key!r} is {problem}")
        total += tensor.numel() * tensor.element_size()
    if total > MAX_EXPANSION * file_size:
        raise CheckpointError(
            f"{path}: its tensors read as {total} bytes from a file of {file_size}: "
            "they view the same stored data under many names"
        )


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    """What makes `tensor` one vlmerge does not merge, or None."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(tensor).__name__}; vlmerge reads plain tensors"
    if tensor.layout != torch.strided or tensor.is_quantized:
        return f"a {'quantized' if tensor.is_quantized else tensor.layout} tensor; vlmerge reads dense tensors"
    if tensor.device.type != "cpu":
        return f"on device {tensor.device}; vlmerge reads tensors with their data"
    if tensor.dtype not in DTYPES.values():
        return f"of dtype {tensor.dtype}; vlmerge reads {', '.join(DTYPES)}"
    if not _own_bytes(tensor):
        return (
            f"a view of shape {list(tensor.shape)} and strides {list(tensor.stride())} over a storage of "
            f"{tensor.untyped_storage().nbytes()} bytes: it repeats elements (a stride-0 or overlapping view) "
            "or reaches past the storage"
        )
    return None


def _own_bytes(tensor: torch.Tensor) -> bool:
    """Whether every element of `tensor` has bytes of its own inside its storage: no stride-0 or other
    overlapping view, through which a small storage would read as a large tensor."""
    if tensor.numel() == 0:
        return True
    reach = 0  # the farthest element, counted from the first, of the dimensions walked so far
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return (tensor.storage_offset() + reach + 1) * tensor.element_size() <= tensor.untyped_storage().nbytes()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
