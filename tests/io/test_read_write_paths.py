"""The fast paths of reading and writing safetensors files keep what the plain ones guarantee.

- Read buffers are used again only once nothing refers to the tensor made over them (views
  included): a tensor read earlier never changes under a later read.
- `read_rows` gives the rows of what `read` gives, reading only their bytes.
- Starting writeback while a file streams changes no byte of it.
- A streamed merge runs one intra-op thread fewer while its inputs are hashed, then all again.
"""

import gc
import os

import pytest
import torch

import vlmerge.io.streaming as streaming_module
import vlmerge.merging.prepared_merge as prepared_merge_module
from vlmerge.core.errors import CheckpointError
from vlmerge.io.checkpoint import open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.io.safetensors_file import POOLED_BYTES, SafetensorsFile
from vlmerge.io.streaming import stream_safetensors
from vlmerge.merging import merge_checkpoint
from vlmerge.models import VLTransformer, save_model

POOLED = POOLED_BYTES[0] // 4 * 3  # float32 entries: a tensor of three times the smallest pooled size


def saved(tmp_path, count: int = 6, numel: int = POOLED) -> tuple[SafetensorsFile, dict[str, torch.Tensor]]:
    tensors = {f"t{i}": torch.arange(numel, dtype=torch.float32) + 1000 * i for i in range(count)}
    path = save_checkpoint(tmp_path / "tensors.safetensors", tensors)
    return SafetensorsFile(path), tensors


def test_tensors_read_earlier_keep_their_values_while_later_ones_are_read(tmp_path):
    file, tensors = saved(tmp_path)
    kept = [file.read(key) for key in tensors]  # all alive at once: each needs its own buffer
    for _ in range(3):
        for key in tensors:
            file.read(key)  # read and dropped at once, buffers going round
    assert len({t.data_ptr() for t in kept}) == len(kept)
    for key, tensor in zip(tensors, kept):
        assert torch.equal(tensor, tensors[key]), key


def test_a_buffer_is_used_again_only_once_every_view_of_its_tensor_is_gone(tmp_path):
    file, tensors = saved(tmp_path, count=2)
    first = file.read("t0")
    address = first.data_ptr()
    view = first[10:20]
    del first
    gc.collect()
    second = file.read("t1")  # the view still holds t0's buffer
    second_address = second.data_ptr()
    assert second_address != address
    assert torch.equal(view, tensors["t0"][10:20])
    del view, second
    gc.collect()
    again = file.read("t1")  # both gone: one of their buffers is used again
    assert again.data_ptr() in {address, second_address}
    assert torch.equal(again, tensors["t1"])


def test_a_read_tensor_can_be_written_and_owns_its_memory(tmp_path):
    file, tensors = saved(tmp_path, count=2)
    tensor = file.read("t0")
    tensor.add_(1)  # writable; changing it changes no other tensor and not the file
    assert torch.equal(file.read("t1"), tensors["t1"])
    assert torch.equal(file.read("t0"), tensors["t0"])
    assert torch.equal(tensor, tensors["t0"] + 1)


def test_small_large_and_odd_dtypes_read_as_before(tmp_path):
    tensors = {
        "small": torch.arange(10, dtype=torch.float64),
        "large": torch.ones(POOLED_BYTES[1] // 4 + 1),  # over the pooled sizes
        "bool": torch.arange(POOLED_BYTES[0] * 2) % 3 == 0,
        "bf16": torch.linspace(-1, 1, POOLED_BYTES[0]).to(torch.bfloat16).reshape(-1, 8),
        "empty": torch.zeros(0, 4),
    }
    with SafetensorsFile(save_checkpoint(tmp_path / "mixed.safetensors", tensors)) as file:
        for key, expected in tensors.items():
            got = file.read(key)
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), key


@pytest.mark.parametrize(("start", "stop"), [(0, 9), (0, 1), (3, 7), (8, 9), (5, 5), (9, 9)])
def test_read_rows_are_the_rows_of_the_tensor(tmp_path, start, stop):
    matrix = torch.randn(9, 5, 2, dtype=torch.float64)
    with SafetensorsFile(save_checkpoint(tmp_path / "m.safetensors", {"m": matrix})) as file:
        assert torch.equal(file.read_rows("m", start, stop), matrix[start:stop])


@pytest.mark.parametrize(("start", "stop"), [(-1, 2), (3, 2), (0, 10)])
def test_rows_outside_the_tensor_are_a_named_error(tmp_path, start, stop):
    with SafetensorsFile(save_checkpoint(tmp_path / "m.safetensors", {"m": torch.zeros(9, 3)})) as file:
        with pytest.raises(CheckpointError, match=f"has no rows {start}:{stop}"):
            file.read_rows("m", start, stop)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_gram_rows_match_the_whole_matrix_in_either_file_kind(tmp_path, suffix):
    x = torch.randn(30, 7, dtype=torch.float64)
    grams = open_grams(save_grams(tmp_path / f"grams{suffix}", {"blocks.0.mlp.v.fc1": x.T @ x}, {}, {}))
    whole = grams.get("blocks.0.mlp.v.fc1")
    for start, stop in [(0, 7), (2, 5), (6, 7)]:
        assert torch.equal(grams.rows("blocks.0.mlp.v.fc1", start, stop), whole[start:stop])


def test_gram_rows_name_nan_like_the_whole_matrix(tmp_path):
    gram = torch.eye(4, dtype=torch.float64)
    gram[2, 1] = float("nan")
    grams = open_grams(save_grams(tmp_path / "grams.safetensors", {"blocks.0.mlp.v.fc1": gram}, {}, {}))
    assert torch.equal(grams.rows("blocks.0.mlp.v.fc1", 0, 2), torch.eye(4, dtype=torch.float64)[:2])
    with pytest.raises(CheckpointError, match="Gram matrix blocks.0.mlp.v.fc1 contains NaN or Inf"):
        grams.rows("blocks.0.mlp.v.fc1", 2, 4)


def test_writeback_while_streaming_changes_no_byte(tmp_path, monkeypatch):
    tensors = {f"w{i}": torch.randn(64, 33) for i in range(9)}
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    plain = tmp_path / "plain.safetensors"
    with stream_safetensors(plain, layout, {"m": "x"}, reserve_metadata=64) as writer:
        for key, value in tensors.items():
            writer.write(key, value)
        writer.update_metadata({"m": "final"})
    advised = []
    monkeypatch.setattr(streaming_module, "WRITEBACK_BYTES", 20_000)  # after every two or three tensors
    real = os.posix_fadvise
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, offset, length, advice: advised.append((offset, length)) or real(fd, offset, length, advice),
    )
    early = tmp_path / "early.safetensors"
    with stream_safetensors(early, layout, {"m": "x"}, reserve_metadata=64) as writer:
        for key, value in tensors.items():
            writer.write(key, value)
        writer.update_metadata({"m": "final"})
    assert early.read_bytes() == plain.read_bytes()
    assert len(advised) >= 3
    assert [offset for offset, _ in advised] == [0] + [o + n for o, n in advised[:-1]]  # each range once, in order
    reader = open_checkpoint(early)
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


def test_a_merge_computes_on_one_thread_and_restores_the_callers_count(micro_config, tmp_path, monkeypatch):
    """Every merged tensor is computed on one intra-op thread (its bytes must not follow the machine's
    thread count, and the hash beside it gets the other cores); the caller's count is restored."""
    source = save_model(VLTransformer(micro_config), tmp_path / "specific.safetensors")
    seen, real_merge_inputs = [], prepared_merge_module._merge_inputs

    def merge_inputs(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_merge_inputs(*args, **kwargs)

    monkeypatch.setattr(prepared_merge_module, "_merge_inputs", merge_inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        merge_checkpoint(source, "interpolation", out=tmp_path / "merged.safetensors")
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
