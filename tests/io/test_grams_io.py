"""Gram collection against a hand computation; checkpoint layouts and atomic writes."""

import pytest
import torch
from conftest import make_inputs

from vlmerge.core.errors import CheckpointError
from vlmerge.io.atomic import atomic_path
from vlmerge.io.checkpoint import open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.io.layout import Layout, from_reference_key, gram_key_to_reference, native_gram_key, to_reference_key
from vlmerge.merging.grams import collect_grams


def test_gram_of_the_first_qkv_is_x_transpose_x_of_its_input(specific_model):
    images = make_inputs(specific_model.config)["images"]
    grams, info = collect_grams(specific_model, [{"images": images}])
    block = specific_model.blocks[0]
    x = block.norm1["v"](specific_model.embed_image(images)).reshape(-1, specific_model.config.width).double()
    expected = x.T @ x  # in float64; each batch's product is taken in float32, so agreement is to float32 rounding
    assert grams["blocks.0.attn.v.qkv"].dtype == torch.float64
    torch.testing.assert_close(
        grams["blocks.0.attn.v.qkv"], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item()
    )
    assert info["blocks.0.attn.v.qkv"] == {"modality": "v", "tokens": x.shape[0], "normalized": False}
    assert "blocks.0.attn.l.qkv" not in grams  # the text expert saw no tokens


def test_padding_tokens_are_left_out_and_normalisation_divides_by_tokens(specific_model):
    inputs = make_inputs(specific_model.config)
    text = {"text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}
    padded, info = collect_grams(specific_model, [text])
    real = inputs["text_mask"][0].sum()
    trimmed = [{"text_ids": inputs["text_ids"][:1, :real]}, {"text_ids": inputs["text_ids"][1:]}]
    unpadded, _ = collect_grams(specific_model, trimmed)
    torch.testing.assert_close(padded["blocks.0.mlp.l.fc2"], unpadded["blocks.0.mlp.l.fc2"])
    assert info["blocks.0.attn.l.qkv"]["tokens"] == int(inputs["text_mask"].sum())
    normalized, _ = collect_grams(specific_model, [text], normalize=True)
    torch.testing.assert_close(
        normalized["blocks.0.attn.l.qkv"] * int(inputs["text_mask"].sum()), padded["blocks.0.attn.l.qkv"]
    )


def test_gram_files_round_trip_in_both_layouts(specific_model, tmp_path):
    grams, info = collect_grams(specific_model, [make_inputs(specific_model.config)])
    native = open_grams(save_grams(tmp_path / "g.safetensors", grams, info, {"checkpoint_sha256": "abc"}))
    assert native.provenance == {"checkpoint_sha256": "abc"} and native.info == info
    torch.save({gram_key_to_reference(k): g for k, g in grams.items()}, tmp_path / "g.pth")
    reference = open_grams(tmp_path / "g.pth")
    assert set(reference.keys) == set(grams)
    torch.testing.assert_close(reference.get("blocks.3.attn.vl.qkv"), grams["blocks.3.attn.vl.qkv"])


@pytest.mark.parametrize(
    "native, reference",
    [
        ("blocks.3.attn.v.qkv", "transformer.blocks.3.attn.v"),  # the attention module stands for its qkv input
        ("blocks.3.attn.qkv", "transformer.blocks.3.attn"),
        ("blocks.3.attn.vl.proj", "transformer.blocks.3.attn.vl.proj"),
        ("blocks.3.mlp.l.fc1", "transformer.blocks.3.mlp.l.fc1"),
        ("blocks.0.mlp.fc2", "transformer.blocks.0.mlp.fc2"),
    ],
)
def test_gram_keys_convert_to_and_from_the_papers_layout(native, reference):
    assert gram_key_to_reference(native) == reference
    assert native_gram_key(from_reference_key(reference), Layout.REFERENCE) == native
    assert native_gram_key(native, Layout.NATIVE) == native


def test_reference_layout_import_then_export_is_lossless(specific_model, tmp_path):
    state = {to_reference_key(k): v for k, v in specific_model.state_dict().items()}
    state["relative_position_bias_table"] = torch.randn(3, 4)
    torch.save({"state_dict": state}, tmp_path / "paper.ckpt")
    reader = open_checkpoint(tmp_path / "paper.ckpt")
    assert reader.layout is Layout.REFERENCE
    assert set(reader.keys) == set(specific_model.state_dict()) | {"relative_position_bias_table"}
    exported = {to_reference_key(k): reader.get(k) for k in reader.keys}
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        open_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "absent.safetensors")
    save_checkpoint(tmp_path / "rect.safetensors", {"blocks.0.mlp.v.fc1": torch.zeros(2, 3)})
    with pytest.raises(CheckpointError, match="expected square"):
        open_grams(tmp_path / "rect.safetensors")
