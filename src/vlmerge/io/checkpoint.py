"""Checkpoints: safetensors with self-describing metadata, read a tensor at a time, written atomically.

A checkpoint is opened once and read from that open file; `CheckpointReader.sha256()` hashes the
file its tensors come from and `check_unchanged()` tells whether the path still names it. The
metadata values vlmerge reads as JSON (`JSON_METADATA`) are checked when the file is opened.
Safetensors outputs are written with sorted header keys, so the same tensors and metadata give
the same bytes.

Foreign `.pt/.pth/.ckpt/.bin` files are read with `torch.load(weights_only=True)` only, so a
file that needs code to unpickle is refused instead of executed; being read whole, they are
refused above `MAX_TORCH_FILE_BYTES`. What torch.load trusts is checked around it (`torch_file`):
before, the zip records and every pickle (nesting, keys, sizes, opcodes); after, that each tensor is
dense CPU data of its own bytes. Released files whose pickles name config classes (Lightning
`hyper_parameters`, argparse `args`) or a `defaultdict` are read with those as inert stand-ins
(`safe_pickle`); their weights are taken from `state_dict`, `module` (DeepSpeed, `module.` prefix
stripped) or `model`.
"""

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vlmerge.core.errors import CheckpointError, OutputError
from vlmerge.io import safe_pickle
from vlmerge.io.atomic import atomic_path
from vlmerge.io.input_file import InputFile
from vlmerge.io.layout import KeyMapping, Layout, map_keys
from vlmerge.io.safetensors_file import SafetensorsFile
from vlmerge.io.streaming import stream_safetensors
from vlmerge.io.torch_file import check_tensors, check_torch_file

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_TORCH_FILE_BYTES = 4 * 2**30  # torch files are read whole into memory; larger ones should be safetensors

# Metadata a merge keeps from its input: it describes the weights (heads, tokenizer), not the merge.
CARRIED_METADATA = ("heads", "tokenizer")

# Metadata values that hold JSON, with the JSON type each must have; checked when a file is opened.
JSON_METADATA: dict[str, type] = {
    "config": dict,
    "merge": dict,
    "provenance": dict,
    "grams": dict,
    "heads": list,
    "tokenizer": dict,
}
_JSON_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


class CheckpointReader:
    """Tensors of one checkpoint under native key names, read one at a time on request."""

    def __init__(
        self,
        path: Path,
        mapping: KeyMapping,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype],
        metadata: dict[str, str],
        fetch,
        file: "SafetensorsFile | InputFile | None" = None,
    ) -> None:
        self.path = path
        self.mapping = mapping
        self.layout = mapping.layout
        self._stored_key = {native: stored for native, (stored, _) in mapping.stored.items()}
        self._batched = {native for native, (_, add_batch_dim) in mapping.stored.items() if add_batch_dim}
        self._shapes = shapes
        self._dtypes = dtypes
        self.metadata = metadata
        self._fetch = fetch
        self._file = file  # the open file tensors are read from; None for an in-memory state dict

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
            tensor = self._fetch(self._stored_key[key])
            return tensor.unsqueeze(0) if key in self._batched else tensor
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"{self.path}: cannot read tensor {key!r} ({error}); the file is corrupt or truncated"
            ) from error

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of tensor `key` (its first dimension): from a safetensors file only their
        bytes are read (RegMean streams its Gram matrices a band at a time); otherwise a slice."""
        if key not in self._stored_key or key in self._batched or not isinstance(self._file, SafetensorsFile):
            return self.get(key)[start:stop]
        try:
            return self._file.read_rows(self._stored_key[key], start, stop)
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"{self.path}: cannot read tensor {key!r} ({error}); the file is corrupt or truncated"
            ) from error

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: self.get(key) for key in self.keys}

    def metadata_json(self, key: str, default: Any = None) -> Any:
        """Metadata value `key` parsed as JSON (a fresh object each call); `default` when absent.

        The keys of `JSON_METADATA` were checked for their type when the file was opened."""
        if key not in self.metadata:
            return default
        return parse_json_metadata(self.metadata, key, self.path)

    @property
    def config(self) -> dict[str, Any] | None:
        """The model config stored with the weights, if this checkpoint carries one."""
        return self.metadata_json("config")

    @property
    def step(self) -> int | None:
        return int(self.metadata["step"]) if "step" in self.metadata else None

    def sha256(self) -> str:
        """SHA-256 of the open file the tensors are read from (not of whatever the path names now)."""
        if self._file is None:
            raise CheckpointError(f"{self.path}: an in-memory state dict has no file to hash")
        return self._file.sha256()

    def check_unchanged(self) -> None:
        """A named CheckpointError if the path no longer names the file opened (replaced, rewritten)."""
        if self._file is not None:
            self._file.check_unchanged()

    def close(self) -> None:
        """Close the file; it is closed too when the reader is collected."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ReaderBacked:
    """A statistics file (Gram matrices, Fisher diagonals) read through one open CheckpointReader
    (`self.reader`): its path, the hash of the file opened, the identity check, closing."""

    reader: CheckpointReader

    @property
    def path(self) -> Path:
        return self.reader.path

    def sha256(self) -> str:
        """SHA-256 of the open file the statistics are read from."""
        return self.reader.sha256()

    def check_unchanged(self) -> None:
        self.reader.check_unchanged()

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_floating(reader: CheckpointReader, what: str) -> None:
    """Statistics are sums and means of products: a bool, integer or complex tensor is none, and would
    merge into wrong values. `what` names one entry (`"Gram matrix {} is"`); the reader is closed on refusal."""
    for key in reader.keys:
        if not reader.dtype(key).is_floating_point:
            dtype = str(reader.dtype(key)).removeprefix("torch.")
            reader.close()
            raise CheckpointError(f"{reader.path}: {what.format(key)} {dtype}, not floating point")


def open_checkpoint(path: str | os.PathLike, layout: Layout | str | None = None) -> CheckpointReader:
    """Open a safetensors or weights-only torch checkpoint in any known layout (io/layout.py): the
    one its keys show, or `layout` when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix in PICKLE_SUFFIXES:
        return _open_torch(path, layout)
    return _open_safetensors(path, layout)


def _open_safetensors(path: Path, layout: Layout | str | None = None) -> CheckpointReader:
    file = SafetensorsFile(path)
    try:
        check_json_metadata(file.metadata, path)
        return _reader(
            path,
            file.keys(),
            {k: e.shape for k, e in file.entries.items()},
            {k: e.dtype for k, e in file.entries.items()},
            file.metadata,
            file.read,
            file,
            layout,
        )
    except BaseException:
        file.close()
        raise


def _open_torch(path: Path, layout: Layout | str | None = None) -> CheckpointReader:
    file = InputFile(path)
    try:
        if file.size > MAX_TORCH_FILE_BYTES:
            raise CheckpointError(
                f"{path}: a torch file of {file.size} bytes is over the {MAX_TORCH_FILE_BYTES} vlmerge reads "
                "(torch files are read whole into memory); convert it to safetensors"
            )
        check_torch_file(file)
        tensors = _load_torch_state(file)
        check_tensors(tensors, path, file.size)
        return reader_from_state_dict(tensors, str(path), file=file, layout=layout)
    except BaseException:
        file.close()
        raise


def _load_torch_state(file: InputFile) -> dict[str, torch.Tensor]:
    path = file.path
    with os.fdopen(os.dup(file.fileno()), "rb") as handle:  # the open file, not the path again
        loaded = _load_torch_object(handle, path)
    return _unwrap_state(loaded, path)


def _load_torch_object(handle: BinaryIO, path: Path) -> Any:
    """The unpickled file: plain `weights_only=True` first; a file it refuses for its globals only is
    read again with config classes as inert stand-ins (`safe_pickle`), any other global refused."""
    try:
        handle.seek(0)
        with warnings.catch_warnings():  # torch warns of pickle protocols and storage types; the file is checked
            warnings.simplefilter("ignore")
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # not refused code: a corrupt pickle
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_one_line(error)})") from None
    except Exception as error:  # torch.load raises many types; each becomes one line
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_one_line(error)})") from None
    try:
        names = safe_pickle.unsafe_globals(handle)
    except Exception:  # not a zip torch file (a legacy or bare pickle): nothing is stood in
        raise CheckpointError(f"{path}: {_NEEDS_CODE}") from None
    try:
        return safe_pickle.load_with_stand_ins(handle, names)
    except safe_pickle.RefusedGlobal as refused:
        raise CheckpointError(
            f"{path}: the file is a pickle that needs code to load: it names the global {refused.name!r}, "
            f"which vlmerge refuses ({refused.reason}); vlmerge never unpickles code. "
            "Re-save it as a plain state dict or as safetensors."
        ) from None
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: the file is a pickle that needs code to load ({_one_line(error)})") from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_one_line(error)})") from None


_NEEDS_CODE = (
    "the file is a pickle that needs code to load; vlmerge never unpickles code "
    "(torch.load weights_only=True). Re-save it as a plain state dict or as safetensors."
)
# Where released files keep their weights: Lightning `state_dict`, DeepSpeed `module`, BEiT-3 `model`.
STATE_KEYS = ("state_dict", "module", "model")


def _unwrap_state(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a bare state dict or of the first of `STATE_KEYS` a wrapper holds; a DeepSpeed
    `module.` prefix on every key is stripped."""
    state = loaded
    if isinstance(loaded, dict) and not _all_tensors(loaded):
        state = next((loaded[k] for k in STATE_KEYS if isinstance(loaded.get(k), dict)), loaded)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path}: expected a state dict (or a dict with one of {list(STATE_KEYS)}), found {type(loaded).__name__}"
        )
    named = next((k for k in state if not isinstance(k, str)), None)
    if named is not None:
        raise CheckpointError(
            f"{path}: state dict key {_short_repr(named)} is not a string ({type(named).__name__}); "
            "vlmerge reads tensors named by strings"
        )
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(set(state) - set(tensors), key=str)
    stood_in = [k for k in skipped if safe_pickle.is_stand_in(state[k])]
    if stood_in:
        raise CheckpointError(
            f"{path}: state dict entry {stood_in[0]!r} is a pickled {state[stood_in[0]].qualified_name} object, "
            "which needs code to load; vlmerge reads only tensors there"
        )
    if skipped:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {skipped[:5]}")
    return tensors


def _all_tensors(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(v, torch.Tensor) for v in mapping.values())


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(error: BaseException) -> str:
    """The first line of an error, without torch's advice to load with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    if "weights_only" in first or "weights only" in first.lower():
        return f"{type(error).__name__}; torch.load(weights_only=True) refused it"
    return first if len(first) <= 300 else first[:297] + "..."


def reader_from_state_dict(
    state: Mapping[str, torch.Tensor],
    name: str = "<memory>",
    *,
    file: InputFile | None = None,
    layout: Layout | str | None = None,
) -> CheckpointReader:
    """Serve an in-memory state dict through the same interface as a file (`file`: the file it was loaded from)."""
    tensors = dict(state)
    return _reader(
        Path(name),
        list(tensors),
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        {},
        tensors.__getitem__,
        file,
        layout,
    )


def parse_json_metadata(metadata: Mapping[str, str], key: str, path: str | os.PathLike) -> Any:
    """Metadata value `key` parsed as JSON, of the type `JSON_METADATA` gives it; one named error if not."""
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({_one_line(error)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: metadata {key!r} is JSON nested too deeply") from None
    expected = JSON_METADATA.get(key)
    if expected is not None and not isinstance(value, expected):
        found = "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)
        raise CheckpointError(f"{path}: metadata {key!r} is {found}, expected {_JSON_NAMES[expected]}")
    return value


def check_json_metadata(metadata: Mapping[str, str], path: str | os.PathLike) -> None:
    """Check, before any tensor is read, every metadata value vlmerge will parse (`JSON_METADATA`, `step`)."""
    for key in JSON_METADATA:
        if key in metadata:
            value = parse_json_metadata(metadata, key, path)
            if key == "heads" and not all(isinstance(name, str) for name in value):
                raise CheckpointError(f"{path}: metadata 'heads' is not a list of head names (strings)")
            if key == "grams" and not all(isinstance(info, dict) for info in value.values()):
                raise CheckpointError(f"{path}: metadata 'grams' is not an object of per-matrix objects")
    if "step" in metadata and not re.fullmatch(r"[0-9]+", metadata["step"]):
        raise CheckpointError(f"{path}: metadata 'step' is {metadata['step'][:40]!r}, not a non-negative integer")


def _reader(path, stored_keys, shapes, dtypes, metadata, fetch, file=None, layout=None) -> CheckpointReader:
    try:
        mapping = map_keys(list(stored_keys), layout)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    native_shapes = {
        native: (1, *shapes[stored]) if add_batch_dim else tuple(shapes[stored])
        for native, (stored, add_batch_dim) in mapping.stored.items()
    }
    native_dtypes = {native: dtypes[stored] for native, (stored, _) in mapping.stored.items()}
    return CheckpointReader(path, mapping, native_shapes, native_dtypes, metadata, fetch, file)


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors atomically: safetensors for `.safetensors`, a plain state dict otherwise.

    Safetensors files are written tensor by tensor in name order with a sorted header, so the same
    tensors and metadata give the same bytes."""
    if not os.fspath(path):  # Path("") would be the current directory
        raise OutputError("the output path is empty; give a file name")
    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)] if metadata else []
    if bad:
        raise CheckpointError(f"metadata values must be strings: {bad}")
    if path.suffix in PICKLE_SUFFIXES:
        with atomic_path(path) as tmp:
            try:
                torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
            except RuntimeError as error:  # torch's writer reports a full disk as a RuntimeError
                raise OutputError(f"{path}: cannot write ({_one_line(error)})") from None
        return path
    names = sorted(tensors)
    layout = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in names]
    with stream_safetensors(path, layout, metadata) as writer:
        for name in names:
            writer.write(name, tensors[name])
    return path


def file_sha256(source: "str | os.PathLike | CheckpointReader | SafetensorsFile | InputFile | BinaryIO") -> str:
    """SHA-256 of a file's bytes. Given an open reader or file object, the file it has open is hashed
    (what was read from it), not whatever its path names now."""
    if isinstance(source, (CheckpointReader, SafetensorsFile, InputFile)):
        return source.sha256()
    if hasattr(source, "fileno"):  # an open file object: hash it from byte 0, leaving its position alone
        with InputFile(getattr(source, "name", "<open file>"), fd=source.fileno()) as file:
            return file.sha256()
    with InputFile(source) as file:
        return file.sha256()
