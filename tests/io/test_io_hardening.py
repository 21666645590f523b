"""The input/output layer under hostile and unlucky conditions.

Inputs are read from the file that was opened, whatever the path names later; the safetensors
reader refuses what the safetensors library refuses (the same malformed files go through both);
metadata parsed as JSON, torch files and OS errors each give one named line; the same tensors
give the same bytes, written with the process umask; an output path is checked before any work.
"""

import errno
import gc
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vlmerge.io.checkpoint as checkpoint_module
import vlmerge.io.streaming as streaming_module
from vlmerge.core.errors import CheckpointError, ConfigError, OutputError
from vlmerge.io.atomic import atomic_path, check_output_path
from vlmerge.io.checkpoint import file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams
from vlmerge.io.safetensors_file import SafetensorsFile
from vlmerge.io.streaming import stream_safetensors


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def tensors(offset: float = 0.0) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.mlp.v.fc1.weight": torch.arange(6.0).reshape(2, 3) + 10 * i + offset for i in range(6)}


def temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


# 1. Inputs are opened once ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_source_replaced_by_rename_is_still_read_and_hashed_from_the_file_opened(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    old, new = tensors(), tensors(offset=1000.0)
    save_checkpoint(path, old)
    old_sha = file_sha256(path)
    reader = open_checkpoint(path)
    save_checkpoint(path, new)  # write-then-rename over the path, as a training run saves its next checkpoint
    assert file_sha256(path) != old_sha
    for key in reader.keys:
        assert torch.equal(reader.get(key), old[key]), key
    assert reader.sha256() == old_sha
    assert file_sha256(reader) == old_sha
    with pytest.raises(CheckpointError, match="replaced by another file") as error:
        reader.check_unchanged()
    assert str(path) in one_line(error)
    reader.close()
    assert file_sha256(path) == open_checkpoint(path).sha256()


def test_safetensors_file_reads_and_hashes_the_open_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tensors())
    old_sha = file_sha256(path)
    with SafetensorsFile(path) as file:
        file.check_unchanged()
        os.replace(save_checkpoint(tmp_path / "other.safetensors", tensors(offset=5.0)), path)
        assert all(torch.equal(file.read(key), value) for key, value in tensors().items())
        assert file.sha256() == old_sha == file_sha256(file)
        with open(path, "rb") as handle:  # an open file object is hashed from byte 0, its position kept
            handle.seek(3)
            assert file_sha256(handle) == file_sha256(path) != old_sha
            assert handle.tell() == 3
        with pytest.raises(CheckpointError, match="replaced"):
            file.check_unchanged()
    with pytest.raises(CheckpointError, match="closed"):
        file.read(next(iter(tensors())))


def test_a_source_rewritten_in_place_or_removed_is_a_named_error(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", tensors())
    reader = open_checkpoint(path)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="modified while it was being read"):
        reader.check_unchanged()
    with pytest.raises(CheckpointError, match="modified"):
        reader.sha256()
    path.unlink()
    with pytest.raises(CheckpointError, match="removed or renamed") as error:
        reader.check_unchanged()
    assert str(path) in one_line(error)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_readers_close_their_file_without_resource_warnings(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", tensors())
    save_checkpoint(tmp_path / "model.pt", tensors())
    grams = save_checkpoint(tmp_path / "grams.safetensors", {"blocks.0.mlp.v.fc1": torch.eye(2)})
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        readers = [open_checkpoint(path), open_checkpoint(tmp_path / "model.pt"), open_grams(grams)]
        assert len(os.listdir("/proc/self/fd")) == before + 3
        del readers  # kept alive for a merge, then dropped without close(): the finalizer closes them
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == before
        with open_checkpoint(path) as reader:
            reader.get(reader.keys[0])
        assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(CheckpointError, match="in-memory"):
        checkpoint_module.reader_from_state_dict(tensors()).sha256()


# 2. The reader refuses what the safetensors library refuses ------------------------------------


def entry(dtype="F32", shape=(1,), offsets=(0, 4), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


def header_of(**entries) -> str:
    return json.dumps(entries)


def write_raw(path: Path, header: str | bytes, data: bytes = b"", length: int | None = None) -> Path:
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + data)
    return path


A = json.dumps(entry())  # one float32 at bytes [0, 4)
DEEP = 200_000

# (id, header, data bytes, the problem the message must name)
MALFORMED = [
    ("duplicate key", f'{{"a":{A},"a":{json.dumps(entry(offsets=(4, 8)))}}}', b"\0" * 8, "key 'a' twice"),
    (
        "overlapping offsets",
        header_of(a=entry(shape=[2], offsets=[0, 8]), b=entry(shape=[2], offsets=[4, 12])),
        b"\0" * 12,
        "overlaps",
    ),
    ("same region twice", header_of(a=entry(), b=entry()), b"\0" * 4, "overlaps"),
    ("gap between tensors", header_of(a=entry(), b=entry(offsets=[8, 12])), b"\0" * 12, "gap"),
    ("gap before the first", header_of(a=entry(offsets=[4, 8])), b"\0" * 8, "gap"),
    ("trailing bytes", header_of(a=entry()), b"\0" * 8, "4 trailing bytes"),
    ("truncated", header_of(a=entry(shape=[2], offsets=[0, 8])), b"\0" * 4, "truncated"),
    ("nested 200,000 deep", '{"a":' + "[" * DEEP + "]" * DEEP + "}", b"", "nested too deeply"),
    ("metadata nested deep", '{"__metadata__":' + "[" * DEEP + "]" * DEEP + "}", b"", "nested too deeply"),
    ("metadata a list", '{"__metadata__":[]}', b"", "__metadata__ is a list"),
    ("metadata a string", '{"__metadata__":"x"}', b"", "__metadata__ is a string"),
    ("metadata number value", '{"__metadata__":{"step":5}}', b"", "'step' is a number"),
    ("metadata object value", '{"__metadata__":{"config":{}}}', b"", "'config' is an object"),
    ("metadata null value", '{"__metadata__":{"k":null}}', b"", "'k' is null"),
    ("unknown dtype", header_of(a=entry(dtype="X99")), b"\0" * 4, "dtype 'X99'"),
    ("dtype not a string", header_of(a=entry(dtype=4)), b"\0" * 4, "dtype 4"),
    ("negative shape", header_of(a=entry(shape=[-1])), b"\0" * 4, "shape"),
    ("float shape", header_of(a=entry(shape=[1.0])), b"\0" * 4, "shape"),
    ("string shape", header_of(a=entry(shape=["1"])), b"\0" * 4, "shape"),
    ("boolean shape", header_of(a=entry(shape=[True])), b"\0" * 4, "shape"),
    ("shape not a list", '{"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}', b"\0" * 4, "shape"),
    ("shape over u64", header_of(a=entry(shape=[0, 2**64], offsets=[0, 0])), b"", "shape"),
    ("shape overflows u64", header_of(a=entry(shape=[2**40, 2**40, 0], offsets=[0, 0])), b"", "2\\*\\*64"),
    ("size not dtype x shape", header_of(a=entry(shape=[2])), b"\0" * 4, "offsets \\[0, 4\\] for 8 bytes"),
    ("end before start", header_of(a=entry(offsets=[4, 0])), b"\0" * 4, "offsets"),
    ("three offsets", header_of(a=entry(offsets=[0, 4, 4])), b"\0" * 4, "data_offsets"),
    ("negative offset", header_of(a=entry(offsets=[-4, 0])), b"\0" * 4, "data_offsets"),
    ("no dtype", '{"a":{"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "no 'dtype'"),
    ("entry not an object", '{"a":5}', b"", "not an object"),
    ("header a list", "[]", b"", "not a JSON object"),
    ("header not JSON", "{nope", b"", "not JSON"),
    ("NaN in the header", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}', b"\0" * 4, "NaN"),
    ("lone surrogate", '{"\\ud800":' + A + "}", b"\0" * 4, "not valid Unicode"),
    ("header not UTF-8", b'{"\xff":' + A.encode() + b"}", b"\0" * 4, "not UTF-8"),
    ("header in UTF-16", "{}".encode("utf-16"), b"", "not UTF-8"),
    ("UTF-8 byte order mark", "\ufeff{}".encode(), b"", "not JSON"),
]


def library_reads(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


@pytest.mark.parametrize(("header", "data", "problem"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_safetensors_are_refused_by_the_library_and_by_vlmerge(tmp_path, header, data, problem):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(Exception):  # noqa: B017 - the library's own error types vary
        library_reads(path)
    with pytest.raises(CheckpointError) as error:
        SafetensorsFile(path)
    message = one_line(error)
    assert message.startswith(f"{path}: not a readable safetensors file")
    assert re.search(problem, message), message
    with pytest.raises(CheckpointError):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("length", "problem"), [(10**6, "exceeds the file"), (100_000_001, "over the format's limit"), (2**64 - 1, "limit")]
)
def test_a_header_length_past_the_file_or_the_limit_is_refused_by_both(tmp_path, length, problem):
    path = write_raw(tmp_path / "bad.safetensors", "{}", length=length)
    with pytest.raises(Exception):  # noqa: B017
        library_reads(path)
    with pytest.raises(CheckpointError, match=problem):
        SafetensorsFile(path)


# Files the library reads: vlmerge reads them too, to the same tensors and metadata.
ACCEPTED = [
    ("metadata null", '{"__metadata__":null,"a":' + A + "}", b"\1\0\0\0"),
    ("offsets listed out of order", header_of(b=entry(offsets=[4, 8]), a=entry()), b"\1\0\0\0\2\0\0\0"),
    ("unknown field in an entry", header_of(a=entry(extra="ignored")), b"\1\0\0\0"),
    (
        "empty tensors at one offset",
        header_of(a=entry(shape=[0], offsets=[0, 0]), b=entry(shape=[2, 0], offsets=[0, 0])),
        b"",
    ),
    ("padded header", header_of(a=entry()) + "    ", b"\1\0\0\0"),
    ("no tensors", "{}", b""),
]


@pytest.mark.parametrize(("header", "data"), [case[1:] for case in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_what_the_library_reads_vlmerge_reads_the_same(tmp_path, header, data):
    path = write_raw(tmp_path / "ok.safetensors", header, data)
    expected, metadata = library_reads(path)
    with SafetensorsFile(path) as file:
        assert file.metadata == (metadata or {})
        assert set(file.keys()) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(file.read(key), tensor)


def test_a_key_given_twice_with_the_same_entry_is_refused_though_the_library_reads_it(tmp_path):
    """The one place vlmerge is stricter: the library keeps the last of two equal keys (serde into a
    map); vlmerge refuses, since readers that keep the first would see another file."""
    path = write_raw(tmp_path / "twice.safetensors", f'{{"a":{A},"a":{A}}}', b"\0" * 4)
    assert list(library_reads(path)[0]) == ["a"]
    with pytest.raises(CheckpointError, match="key 'a' twice"):
        SafetensorsFile(path)


def test_vlmerge_outputs_are_read_by_the_library(tmp_path):
    path = save_checkpoint(
        tmp_path / "m.safetensors", {"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.arange(4)}, {"k": "v"}
    )
    found, metadata = library_reads(path)
    assert metadata == {"k": "v"} and torch.equal(found["a"], torch.arange(4)) and found["b"].dtype == torch.bfloat16


# 3. Metadata that vlmerge parses as JSON ------------------------------------------------------

BAD_METADATA = [
    ("config", "{not json", "not valid JSON"),
    ("config", "[1, 2]", "is a list, expected an object"),
    ("config", "null", "is null, expected an object"),
    ("merge", '"a string"', "is a string, expected an object"),
    ("provenance", "5", "is a number, expected an object"),
    ("grams", "[]", "is a list, expected an object"),
    ("grams", '{"blocks.0.mlp.v.fc1": 3}', "per-matrix objects"),
    ("heads", '{"head": 1}', "is an object, expected a list"),
    ("heads", "[1]", "head names"),
    ("tokenizer", "garbage", "not valid JSON"),
    ("tokenizer", "[" * DEEP + "]" * DEEP, "nested too deeply"),
    ("step", "-5", "not a non-negative integer"),
    ("step", "twelve", "not a non-negative integer"),
]


@pytest.mark.parametrize(("key", "value", "problem"), BAD_METADATA, ids=[f"{k}={v[:12]}" for k, v, _ in BAD_METADATA])
def test_bad_json_metadata_is_one_error_naming_the_key_and_the_file(tmp_path, key, value, problem):
    path = save_checkpoint(tmp_path / "m.safetensors", {"blocks.0.mlp.v.fc1": torch.eye(2)}, {key: value})
    for opener in (open_checkpoint, open_grams):
        with pytest.raises(CheckpointError, match=problem) as error:
            opener(path)
        message = one_line(error)
        assert str(path) in message and repr(key) in message


def test_good_json_metadata_reads_back(tmp_path):
    metadata = {"config": '{"width": 8}', "heads": '["itm"]', "grams": '{"m": {"tokens": 3}}', "step": "12"}
    reader = open_checkpoint(save_checkpoint(tmp_path / "m.safetensors", {"m": torch.eye(2)}, metadata))
    assert reader.config == {"width": 8} and reader.step == 12 and reader.metadata_json("heads") == ["itm"]
    assert reader.metadata_json("absent", {}) == {}
    assert open_grams(reader.path).info == {"m": {"tokens": 3}}


# 4. Torch files ------------------------------------------------------------------------------


class NeedsCode:  # unpickling this needs code: weights_only refuses it
    pass


def test_a_torch_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.pt"
    torch.save(tensors(), path)
    monkeypatch.setattr(checkpoint_module, "MAX_TORCH_FILE_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read although over the limit"))
    with pytest.raises(CheckpointError, match="convert it to safetensors") as error:
        open_checkpoint(path)
    assert str(path) in one_line(error)


def torch_file_with(tmp_path: Path, name: str, write) -> Path:
    path = tmp_path / name
    write(path)
    return path


BAD_TORCH = {
    "needs code": lambda p: torch.save({"a": NeedsCode()}, p),
    "garbage": lambda p: p.write_bytes(b"this is not a torch file at all\n" * 4),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: (torch.save(tensors(), p), p.write_bytes(p.read_bytes()[:300])),
    "a list": lambda p: torch.save([torch.ones(2)], p),
    "not tensors": lambda p: torch.save({"a": 1}, p),
}


@pytest.mark.parametrize("case", list(BAD_TORCH))
def test_every_torch_load_failure_is_one_line_without_weights_only_false_advice(tmp_path, case):
    path = torch_file_with(tmp_path, "bad.pt", BAD_TORCH[case])
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    message = one_line(error)
    assert message.startswith(f"{path}: ")
    assert "weights_only=False" not in message.replace(" ", "") and "False" not in message, message
    if case == "needs code":
        assert "needs code" in message


# 5. Same inputs, same bytes; the process umask ---------------------------------------------------

METADATA = {f"key{i}": f"value {i}" for i in range(12)}


def test_two_saves_of_the_same_tensors_and_metadata_are_byte_identical(tmp_path):
    first = save_checkpoint(tmp_path / "a.safetensors", tensors(), METADATA)
    shuffled = dict(reversed(list(METADATA.items())))
    second = save_checkpoint(tmp_path / "b.safetensors", dict(reversed(list(tensors().items()))), shuffled)
    assert first.read_bytes() == second.read_bytes()
    script = (
        "import sys, torch; from vlmerge.io.checkpoint import save_checkpoint; "
        f"save_checkpoint(sys.argv[1], {{f'blocks.{{i}}.mlp.v.fc1.weight': torch.arange(6.0).reshape(2, 3) + 10 * i "
        f"for i in range(6)}}, {METADATA!r})"
    )
    other = tmp_path / "c.safetensors"  # another process: another hash seed, another map order
    subprocess.run([sys.executable, "-c", script, str(other)], check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    assert other.read_bytes() == first.read_bytes()


def test_streamed_headers_are_sorted(tmp_path):
    layout = [("b", torch.float32, (1,)), ("a", torch.float32, (1,))]
    outputs = []
    for name, metadata in (("x", {"z": "1", "y": "2"}), ("y", {"y": "2", "z": "1"})):
        with stream_safetensors(tmp_path / f"{name}.safetensors", layout, metadata, reserve_metadata=64) as writer:
            writer.write("b", torch.ones(1))
            writer.write("a", torch.zeros(1))
            writer.update_metadata(dict(reversed(list(metadata.items()))))
        outputs.append((tmp_path / f"{name}.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0].index(b'"__metadata__"') < outputs[0].index(b'"a"') and outputs[0].index(b'"y"') < outputs[
        0
    ].index(b'"z"')


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_process_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        written = [
            save_checkpoint(tmp_path / "m.safetensors", tensors()),
            save_checkpoint(tmp_path / "m.pt", tensors()),
        ]
        with atomic_path(tmp_path / "plain.txt") as tmp:
            tmp.write_text("x")
        written.append(tmp_path / "plain.txt")
    finally:
        os.umask(previous)
    assert [oct(path.stat().st_mode & 0o777) for path in written] == [oct(mode)] * 3


# 6. OS errors, and the output path checked before any work ---------------------------------------


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming_module, "open", lambda *a, **k: FullDisk(open(*a, **k), room=100), raising=False)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(OutputError, match="No space left on device") as error:
        save_checkpoint(out, tensors())
    assert isinstance(error.value, CheckpointError) and str(out) in one_line(error)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_torch_saves_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\nmore detail")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match="cannot write") as error:
        save_checkpoint(tmp_path / "m.pt", tensors())
    assert str(tmp_path / "m.pt") in one_line(error)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_directory_is_one_line(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_open = os.open

    def refuse_in_locked(path, *args, **kwargs):  # root ignores the mode bits: refuse as the kernel would
        if Path(path).parent == locked and len(args) > 0 and args[0] & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "open", refuse_in_locked)
    try:
        with pytest.raises(OutputError, match="Permission denied") as error:
            save_checkpoint(locked / "m.safetensors", tensors())
        assert str(locked / "m.safetensors") in one_line(error)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("name", ["", "dir", "dir/"])
def test_an_empty_path_or_a_directory_as_destination_is_one_line(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError) as error:
        save_checkpoint(name, tensors())
    message = one_line(error)
    assert ("empty" in message) if not name else ("is a directory" in message and message.startswith("dir"))
    assert [p.name for p in tmp_path.iterdir()] == ["dir"] and list((tmp_path / "dir").iterdir()) == []


def test_an_os_error_about_another_file_is_not_blamed_on_the_output(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.bin"):
            open(tmp_path / "missing-input.bin", "rb")
    assert list(tmp_path.iterdir()) == []


def test_a_nested_writes_error_keeps_its_own_path_and_is_an_os_error(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError, match="dir: is a directory") as error:  # an OSError: old handlers still catch it
        with atomic_path(tmp_path / "outer.bin"):
            with atomic_path(tmp_path / "dir"):
                pass
    assert isinstance(error.value, OutputError) and "outer" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]


def test_check_output_path_accepts_a_new_file_or_an_old_output(tmp_path):
    source = save_checkpoint(tmp_path / "specific.safetensors", tensors())
    assert check_output_path(tmp_path / "merged.safetensors", [source, None]) == tmp_path / "merged.safetensors"
    new_directories = tmp_path / "new" / "dirs" / "m.safetensors"  # atomic_path creates them
    assert check_output_path(new_directories, [source]) == new_directories
    (tmp_path / "merged.safetensors").write_bytes(b"an earlier output")
    assert check_output_path(str(tmp_path / "merged.safetensors"), [source]) == tmp_path / "merged.safetensors"


def test_check_output_path_refuses_an_input_by_any_name(tmp_path, monkeypatch):
    source = save_checkpoint(tmp_path / "specific.safetensors", tensors())
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(source)
    os.link(source, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    for out in [source, "specific.safetensors", "sub/../specific.safetensors", "link.safetensors", "hard.safetensors"]:
        with pytest.raises(ConfigError, match="is the input") as error:
            check_output_path(out, [None, tmp_path / "grams.safetensors", source])
        assert str(out) in one_line(error)
    with pytest.raises(ConfigError, match="is the input"):
        check_output_path(tmp_path / "g.safetensors", [source, "g.safetensors"])  # an input not yet on disk, same path


@pytest.mark.parametrize(
    ("out", "problem"),
    [
        ("", "empty"),
        ("sub", "is a directory"),
        ("sub/", "is a directory"),
        ("file.txt/m.safetensors", "is not a directory"),
        ("file.txt/new/m.safetensors", "is not a directory"),
    ],
)
def test_check_output_path_refuses_what_cannot_be_written(tmp_path, monkeypatch, out, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=problem) as error:
        check_output_path(out, [])
    assert out in one_line(error)


def test_check_output_path_refuses_a_directory_it_cannot_write(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **k: Path(path) != locked)  # as for a non-root user
    with pytest.raises(ConfigError, match="is not writable") as error:
        check_output_path(locked / "m.safetensors", [])
    assert str(locked / "m.safetensors") in one_line(error)
