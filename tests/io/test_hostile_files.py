"""Torch files built to crash, flood or fool the readers: each is refused with one line (exit 2
through the CLI) before it can do harm, and the released files and ordinary views still read.

Hostile pickles are written opcode by opcode or with a pickler that emits torch's storage records
(`dumps`), inside a zip laid out as torch.save lays it out (`torch_zip`) or in the legacy format
(`legacy_file`)."""

import _compat_pickle
import collections
import copy
import io
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from vlmerge.cli.main import main
from vlmerge.core.errors import CheckpointError
from vlmerge.core.keys import parse_block_path
from vlmerge.io import safe_pickle
from vlmerge.io.checkpoint import open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams
from vlmerge.io.statistics import FISHER_FORMAT, open_fisher
from vlmerge.models import VLTransformer

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


# Building hostile files ------------------------------------------------------------------------


class Storage:
    """A storage record a hand-made pickle points to, as torch.save names one."""

    def __init__(self, key: str, numel: int, cls: type = torch.FloatStorage, view: tuple | None = None) -> None:
        self.key, self.numel, self.cls, self.view = key, numel, cls, view


class Rebuilt:
    """A tensor as torch pickles one: `_rebuild_tensor_v2` over a storage record."""

    def __init__(self, storage: Storage, size: tuple, stride: tuple, offset: int = 0) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class TorchPickler(pickle.Pickler):
    def __init__(self, file, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        extra = (obj.view,) if self.legacy else ()
        return ("storage", obj.cls, obj.key, "cpu", obj.numel, *extra)


def dumps(obj: object, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    TorchPickler(buffer, legacy).dump(obj)
    return buffer.getvalue()


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, compression: int = 0) -> Path:
    """A zip archive laid out as torch.save lays one out: `data.pkl` and one record per storage."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


def legacy_file(path: Path, obj: object, storages: dict[str, bytes]) -> Path:
    """torch's format before 1.6: magic number, protocol, system info, the object, its storage keys, data."""
    system = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(value, protocol=2) for value in (LEGACY_MAGIC_NUMBER, 1001, system)]
    parts += [dumps(obj, legacy=True), pickle.dumps(list(storages), protocol=2)]
    parts += [struct.pack("<q", len(data) // 4) + data for data in storages.values()]
    path.write_bytes(b"".join(parts))
    return path


def deep_tuple_key(depth: int) -> bytes:
    """`{((...(1,),...),): 1}`: a dict whose key is a tuple `depth` levels deep, and no global at all."""
    return b"\x80\x02}K\x01" + pickle.TUPLE1 * depth + b"K\x01s."


def memo_put(index: int) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", index)


def memo_get(index: int) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", index)


def refused(capsys, path: Path, *words: str) -> str:
    """Merging `path` through the CLI exits 2 with one line that names the file and `words`, writing nothing."""
    out = path.parent / "merged.safetensors"
    capsys.readouterr()
    assert main(["merge", str(path), "--method", "interpolation", "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and all(word in err[0] for word in words), err
    assert not out.exists()
    return err[0]


@pytest.fixture
def state(micro_config) -> dict[str, torch.Tensor]:
    """A micro multiway model's weights: a file of them merges, so a refusal is the file's fault."""
    torch.manual_seed(0)
    return VLTransformer(micro_config).state_dict()


# 1. Nesting and keys --------------------------------------------------------------------------


def test_a_tuple_key_a_million_deep_is_refused_before_torch_hashes_it(tmp_path):
    """Hashing such a key crashes CPython (SIGSEGV), so this runs apart: a crash fails the test, not pytest."""
    path = torch_zip(tmp_path / "deep.pt", deep_tuple_key(10**6))
    script = "import sys; from vlmerge.io.checkpoint import open_checkpoint; open_checkpoint(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, (run.returncode, run.stderr[-500:])  # an exception, not a signal
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("vlmerge.core.errors.CheckpointError") and "nested more than 100 levels" in last


def test_a_tuple_key_a_thousand_deep_is_one_line(tmp_path, capsys):
    refused(capsys, torch_zip(tmp_path / "deep.pt", deep_tuple_key(1000)), "nested more than 100 levels")


def test_lists_nested_after_they_were_filled_count_as_deep(tmp_path, capsys):
    """Lists made first and linked later through the memo (L0 holds L1 holds ... L199) nest as deep as any."""
    made = b"".join(pickle.EMPTY_LIST + memo_put(i) for i in range(200))
    linked = b"".join(memo_get(i) + memo_get(i + 1) + pickle.APPEND for i in range(199))
    path = torch_zip(tmp_path / "linked.pt", b"\x80\x02" + made + linked + b".")
    refused(capsys, path, "nested more than 100 levels")


def test_a_list_held_many_times_and_deepened_late_is_refused_without_walking_every_holder(tmp_path, capsys):
    """X is put into one list 20000 times, then deepened a level at a time: each level would revisit every holder."""
    held = pickle.EMPTY_LIST + memo_put(0) + pickle.EMPTY_LIST + memo_put(1) + (memo_get(0) + pickle.APPEND) * 20000
    deepen = [
        pickle.EMPTY_LIST + memo_put(i) + memo_get(i - 1 if i > 2 else 0) + memo_get(i) + pickle.APPEND
        for i in range(2, 60)
    ]
    path = torch_zip(tmp_path / "held.pt", b"\x80\x02" + held + b"".join(deepen) + b".")
    refused(capsys, path, "filled after they were nested")


def test_a_state_dict_key_that_is_not_a_string_is_one_line(tmp_path, capsys, state):
    torch.save({**state, 1: torch.ones(2)}, tmp_path / "int-key.pt")
    refused(capsys, tmp_path / "int-key.pt", "state dict key 1 is not a string (int)")


def test_a_list_as_a_dict_key_is_refused_before_torch_loads_it(tmp_path, capsys):
    refused(capsys, torch_zip(tmp_path / "list-key.pt", b"\x80\x02}]K\x01s."), "a dict key that is a list")


def test_a_lightning_checkpoint_with_optimizer_states_nests_within_the_limit(tmp_path):
    """A Lightning checkpoint with optimizer states (int keys there), loops and callbacks reads."""
    weights = {"transformer.blocks.0.mlp.v.fc1.weight": torch.randn(4, 2), "head.bias": torch.zeros(3)}
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, 2)}},
        "param_groups": [{"params": [0]}],
    }
    loops = {"fit_loop": {"epoch_loop": {"state_dict": {"batch_progress": {"total": {"ready": 7}}}}}}
    lightning = {"state_dict": weights, "optimizer_states": [optimizer], "loops": loops, "callbacks": {"cb": {}}}
    torch.save(lightning, tmp_path / "epoch=1.ckpt")
    reader = open_checkpoint(tmp_path / "epoch=1.ckpt")
    assert torch.equal(reader.get("blocks.0.mlp.v.fc1.weight"), weights["transformer.blocks.0.mlp.v.fc1.weight"])


# 2. Amplification -----------------------------------------------------------------------------


VIEWS = {
    "stride 0": lambda: torch.ones(1).expand(20000, 20000),
    "overlapping": lambda: torch.arange(199.0).as_strided((100, 100), (1, 1)),
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_a_view_that_repeats_a_small_storage_is_refused(tmp_path, capsys, state, view):
    torch.save({**state, "head.weight": VIEWS[view]()}, tmp_path / "view.pt")
    assert (tmp_path / "view.pt").stat().st_size < 10**6
    refused(capsys, tmp_path / "view.pt", "tensor 'head.weight'", "repeats elements")


def test_one_storage_under_many_names_is_refused_past_eight_times_the_file(tmp_path, capsys):
    shared = torch.randn(128, 128)
    torch.save({f"head{i}.weight": shared for i in range(100)}, tmp_path / "shared.pt")
    refused(capsys, tmp_path / "shared.pt", "under many names")


def test_views_that_torch_save_keeps_read_as_saved(tmp_path):
    """Slices, transposes, offsets and tied weights are views of their own bytes: read unchanged."""
    base = torch.randn(6, 8)
    views = {"t": base.t(), "slice": base[:, 2:5], "offset": base[3:], "step": base[::2], "tied": base, "same": base}
    torch.save(views, tmp_path / "views.pt")
    reader = open_checkpoint(tmp_path / "views.pt")
    assert all(torch.equal(reader.get(key), value) for key, value in views.items())


def test_a_compressed_record_is_refused_before_torch_inflates_it(tmp_path, capsys, monkeypatch):
    buffer = io.BytesIO()
    torch.save({"head.weight": torch.zeros(10**6)}, buffer)  # 4 MB of zeros deflate to a few KB
    source = zipfile.ZipFile(buffer)
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info))
    assert (tmp_path / "bomb.pt").stat().st_size < 100_000
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read a compressed archive"))
    refused(capsys, tmp_path / "bomb.pt", "is compressed", "unpack to")


def test_records_that_share_their_bytes_are_refused(tmp_path, capsys):
    """Fifty directory entries naming one record's bytes would load as fifty storages of them."""
    count, numel = 50, 2**16
    data_pkl = dumps({f"head{i}.weight": Rebuilt(Storage(str(i), numel), (numel,), (1,)) for i in range(count)})
    with zipfile.ZipFile(tmp_path / "aliased.pt", "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", bytes(4 * numel))
        for i in range(1, count):
            alias = copy.copy(archive.getinfo("archive/data/0"))
            alias.filename = alias.orig_filename = f"archive/data/{i}"
            archive.filelist.append(alias)
        archive.writestr("archive/version", "3\n")
    refused(capsys, tmp_path / "aliased.pt", "record 'archive/data/1' overlaps the record before it")


def test_a_storage_larger_than_its_record_is_refused(tmp_path, capsys):
    data_pkl = dumps({"head.weight": Rebuilt(Storage("0", 10**9), (10**9,), (1,))})
    path = torch_zip(tmp_path / "short.pt", data_pkl, {"0": bytes(16)})
    refused(capsys, path, "storage '0' declares 4000000000 bytes", "a record of 16 bytes")


def test_a_legacy_storage_larger_than_the_file_is_refused_before_it_is_allocated(tmp_path, capsys):
    """The legacy reader allocates the size the pickle declares before it reads a byte of data."""
    path = legacy_file(
        tmp_path / "legacy.pt", {"head.weight": Rebuilt(Storage("0", 10**11), (4,), (1,))}, {"0": bytes(16)}
    )
    refused(capsys, path, "storages declare 400000000008 bytes")


def test_a_legacy_file_reads_as_saved(tmp_path, state):
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    reader = open_checkpoint(tmp_path / "legacy.pt")
    assert all(torch.equal(reader.get(key), value) for key, value in state.items())


# 3. Pickle protocols ---------------------------------------------------------------------------


def test_a_protocol_4_state_dict_names_its_protocol_and_torch_warns_nothing(tmp_path, capsys, state):
    torch.save(state, tmp_path / "protocol4.pt", pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = refused(capsys, tmp_path / "protocol4.pt", "pickle opcode FRAME (pickle protocol 4)", "re-save")
    assert "needs code" not in line and caught == []


def test_a_protocol_3_state_dict_reads_without_a_warning(tmp_path, state):
    torch.save(state, tmp_path / "protocol3.pt", pickle_protocol=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = open_checkpoint(tmp_path / "protocol3.pt")
    assert caught == [] and all(torch.equal(reader.get(key), value) for key, value in state.items())


def test_a_plain_pickle_of_tensors_is_named_as_such(tmp_path, capsys):
    with open(tmp_path / "pickled.pt", "wb") as handle:
        pickle.dump({"head.weight": torch.ones(2)}, handle, protocol=2)
    refused(capsys, tmp_path / "pickled.pt", "a plain pickle, not a torch.save file")


MALFORMED = {
    "truncated": (b"\x80\x02}X\x05\x00\x00\x00ab", "asks for 5 bytes where 2 remain"),
    "long string": (b"\x80\x02X\xff\xff\xff\xff.", "asks for 4294967295 bytes"),
    "unwritten memo": (b"\x80\x02h\x07.", "memo entry 7"),
    "empty stack": (b"\x80\x02s.", "empty stack"),
    "no stop": (b"\x80\x02}", "ends before its STOP"),
    "not a storage": (b"\x80\x02K\x01Q.", "persistent id that is not a torch storage"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_pickle_is_one_line(tmp_path, capsys, case):
    data_pkl, words = MALFORMED[case]
    refused(capsys, torch_zip(tmp_path / "bad.pt", data_pkl), words)


# 4. Python 2 names -----------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(_compat_pickle.IMPORT_MAPPING))
def test_a_python_2_module_is_judged_as_the_module_pickle_maps_it_to(module):
    with pytest.raises(safe_pickle.RefusedGlobal, match="Python 2's name for"):
        safe_pickle.classify(f"{module}.Config")


@pytest.mark.parametrize("name", sorted(f"{m}.{n}" for m, n in _compat_pickle.NAME_MAPPING))
def test_a_python_2_name_is_refused_or_the_harmless_builtin_it_maps_to(name):
    try:
        admitted = safe_pickle.classify(name)
    except safe_pickle.RefusedGlobal:
        return
    assert isinstance(admitted, safe_pickle.InertMarker), (name, admitted)  # __builtin__.unicode: str, never called


def test_commands_popen_is_refused_as_subprocess_popen(tmp_path, capsys):
    data_pkl = b"\x80\x02}(X\x05\x00\x00\x00modelq\x00}X\x06\x00\x00\x00configccommands\nPopen\n)\x81u."
    line = refused(capsys, torch_zip(tmp_path / "py2.ckpt", data_pkl), "'commands.Popen'", "subprocess.Popen")
    assert "needs code to load" in line


# 5. Keys and tensors vlmerge does not merge ------------------------------------------------------


@pytest.mark.parametrize(
    "key, words",
    [
        ("blocks." + "1" * 5001 + ".attn.v.qkv.weight", "a layer index of 5001 digits"),
        ("blocks." + "1" * 7 + ".attn.v.qkv.weight", "a layer index of 7 digits"),
        ("head." + "9" * 100 + ".weight", "a number of 100 digits"),
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_key_with_an_overlong_number_is_one_line(tmp_path, capsys, state, key, words, suffix):
    save_checkpoint(tmp_path / f"long{suffix}", {**state, key: torch.ones(2, 2)})
    refused(capsys, tmp_path / f"long{suffix}", words)


def test_a_layer_index_has_at_most_six_digits():
    assert parse_block_path("blocks.999999.attn.v.qkv.weight").layer == 999999
    assert parse_block_path("blocks.1000000.attn.v.qkv.weight") is None


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        return torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)


def nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


NOT_DENSE = {
    "sparse": (lambda: torch.eye(3).to_sparse(), "a sparse tensor"),
    "meta": (lambda: torch.empty(3, 3, device="meta"), "a meta tensor"),
    "quantized": (quantized, "a quantized tensor"),
    "nested": (nested, "a nested tensor"),
    "complex": (lambda: torch.ones(3, dtype=torch.complex64), "of dtype torch.complex64"),
    "uint16": (lambda: torch.ones(3, dtype=torch.uint16), "of dtype torch.uint16"),
    "float8": (lambda: torch.ones(3).to(torch.float8_e4m3fn), "of dtype torch.float8_e4m3fn"),
}


@pytest.mark.parametrize("kind", list(NOT_DENSE))
def test_a_tensor_that_is_not_plain_dense_cpu_data_is_one_line(tmp_path, capsys, state, kind):
    make, words = NOT_DENSE[kind]
    torch.save({**state, "head.weight": make()}, tmp_path / f"{kind}.pt")
    refused(capsys, tmp_path / f"{kind}.pt", words)


def test_parameters_read_as_tensors(tmp_path, state):
    torch.save({k: torch.nn.Parameter(v, requires_grad=False) for k, v in state.items()}, tmp_path / "params.pt")
    reader = open_checkpoint(tmp_path / "params.pt")
    assert all(torch.equal(reader.get(key), value) for key, value in state.items())


# 6. Statistics are floating point --------------------------------------------------------------


STATISTICS_DTYPES = [torch.bool, torch.int64, torch.uint8]


@pytest.mark.parametrize("dtype", STATISTICS_DTYPES, ids=str)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_gram_file_that_is_not_floating_point_is_refused(tmp_path, dtype, suffix):
    path = save_checkpoint(tmp_path / f"grams{suffix}", {"blocks.0.attn.v.qkv": torch.eye(4).to(dtype)})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"Gram matrix blocks.0.attn.v.qkv is {name}, not floating") as error:
        open_grams(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_bool_gram_file_stops_a_regmean_merge_with_one_line(tmp_path, capsys, state):
    source = save_checkpoint(tmp_path / "specific.safetensors", state)
    grams = save_checkpoint(tmp_path / "grams.safetensors", {"blocks.0.attn.v.qkv": torch.eye(32, dtype=torch.bool)})
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(source), "--method", "regmean", "--grams", str(grams), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Gram matrix blocks.0.attn.v.qkv is bool" in err[0] and not out.exists(), err


@pytest.mark.parametrize("dtype", STATISTICS_DTYPES, ids=str)
def test_a_fisher_file_that_is_not_floating_point_is_refused(tmp_path, dtype):
    fisher = {"blocks.0.attn.v.qkv.weight": torch.ones(4, 4, dtype=dtype)}
    path = save_checkpoint(tmp_path / "fisher.safetensors", fisher, {"format": FISHER_FORMAT})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"Fisher statistics blocks.0.attn.v.qkv.weight are {name}, not floating"):
        open_fisher(path)
