"""BEiT-3 checkpoints, checked against torchscale's own BEiT3 (not our reading of it).

A random test-sized torchscale BEiT3 is saved as a released file is (`{"model": state_dict}`),
imported, and compared for images, padded text and pairs; merged with `vlmerge merge --layout
beit3` (tied A/B experts), loaded strictly back into torchscale and compared with vlmerge's own
merged model. Max abs differences are printed (pytest -s) and kept in
test-artifacts/beit3-differences.json.
"""

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from torchscale_reference import beit3_class, beit3_config, random_beit3

from vlmerge.cli.main import main
from vlmerge.core.errors import CheckpointError
from vlmerge.io.checkpoint import file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.grams import save_grams
from vlmerge.io.layout import Layout, detect_layout
from vlmerge.merging.grams import collect_grams
from vlmerge.models.checkpoint import load_model

TOLERANCE = 1e-4  # float32
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # where a person reads the differences


def report(name: str, differences: dict[str, float]) -> None:
    """Print the max abs differences and keep them in test-artifacts/beit3-differences.json."""
    print(f"{name}, max abs difference: {differences}")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "beit3-differences.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**recorded, name: differences}, indent=2, sort_keys=True))


IMAGE_TOKENS = 17  # (32 / 8)^2 patches + cls


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(torchscale model, its config, the file it was saved to as BEiT-3 releases are saved)."""
    model, config = random_beit3()
    path = tmp_path_factory.mktemp("beit3") / "beit3_base_patch16.pth"
    torch.save({"model": model.state_dict()}, path)
    return model, config, path


def inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    text_ids = torch.randint(0, 100, (2, 7), generator=generator)
    text_mask = torch.ones(2, 7, dtype=torch.bool)
    text_mask[1, 4:] = False
    return images, text_ids, text_mask


def max_differences(reference, ours) -> dict[str, float]:
    """Reference (torchscale) vs vlmerge encoder outputs on images, padded text and pairs. torchscale
    puts a pair's image first, vlmerge its text; padded positions are left out."""
    images, ids, mask = inputs()
    with torch.no_grad():
        image = (reference(visual_tokens=images)["encoder_out"] - ours(images=images).hidden).abs().max()
        theirs = reference(textual_tokens=ids, text_padding_position=~mask)["encoder_out"]
        text = (theirs - ours(text_ids=ids, text_mask=mask).hidden)[mask].abs().max()
        theirs = reference(textual_tokens=ids, visual_tokens=images, text_padding_position=~mask)["encoder_out"]
        pair = ours(images=images, text_ids=ids, text_mask=mask).hidden
        pair_image = (theirs[:, :IMAGE_TOKENS] - pair[:, ids.shape[1] :]).abs().max()
        pair_text = (theirs[:, IMAGE_TOKENS:] - pair[:, : ids.shape[1]])[mask].abs().max()
    return {"image": float(image), "text": float(text), "pair": float(max(pair_image, pair_text))}


def test_an_imported_beit3_reproduces_torchscale(released):
    reference, config, path = released
    assert open_checkpoint(path).layout is Layout.BEIT3
    ours = load_model(path).eval()
    assert (ours.config.family, ours.config.width, ours.config.depth, ours.config.heads) == ("beit3", 128, 3, 2)
    assert ours.config.max_text_len == config.max_source_positions - 2  # fairseq's offset of 2
    differences = max_differences(reference, ours)
    report("imported BEiT-3 vs torchscale", differences)
    assert max(differences.values()) <= TOLERANCE


def test_merging_with_the_beit3_layout_loads_strictly_into_torchscale(released, tmp_path):
    _, config, path = released
    tied, native = tmp_path / "merged.pth", tmp_path / "merged.safetensors"
    for out, layout in ((tied, "beit3"), (native, "native")):
        code, _, err = run_cli(
            ["merge", str(path), "--method", "interpolation", "--experts", "retrieval", "--layout", layout]
            + ["--out", str(out), "--quiet"]
        )
        assert code == 0, err
    state = torch.load(tied, weights_only=True)
    for key in state:  # every expert in the layers holds the merged weights (position tables, final norms pass through)
        if key.startswith("encoder.layers.") and ".A." in key:
            torch.testing.assert_close(state[key], state[key.replace(".A.", ".B.")], rtol=0, atol=0)
    _, BEiT3 = beit3_class()
    merged_reference = BEiT3(config).eval()
    merged_reference.load_state_dict(state, strict=True)
    ours = load_model(native).eval()
    assert not ours.config.is_multiway
    differences = max_differences(merged_reference, ours)
    report("merged BEiT-3 (torchscale, tied A/B) vs vlmerge's merged model", differences)
    assert max(differences.values()) <= TOLERANCE


def test_the_merge_is_the_average_of_the_experts_under_both_names(released, tmp_path):
    _, _, path = released
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["merge", str(path), "--method", "interpolation", "--layout", "beit3", "--out", str(out)])
    assert code == 0, err
    source = torch.load(path, weights_only=True)["model"]
    merged = open_checkpoint(out)
    assert merged.layout is Layout.BEIT3 and merged.config["family"] == "beit3"
    key = "encoder.layers.1.self_attn.k_proj.{}.bias"
    expected = (source[key.format("A")] + source[key.format("B")]) / 2
    torch.testing.assert_close(merged.get("blocks.1.attn.v.k_proj.bias"), expected)
    torch.testing.assert_close(merged.get("blocks.1.attn.l.k_proj.bias"), expected)
    load_model(out)  # the tied file reads back as a multiway model whose experts agree


def test_a_unilm_wrapped_file_keeps_its_prefix_and_heads(released, tmp_path):
    reference, _, _ = released
    state = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    state["language_head.weight"] = torch.randn(4, 128)
    wrapped = tmp_path / "beit3_base_itc.pth"
    torch.save({"model": state, "args": None}, wrapped)
    reader = open_checkpoint(wrapped)
    assert reader.layout is Layout.BEIT3 and reader.mapping.prefix == "beit3."
    assert "language_head.weight" in reader and "blocks.0.attn.v.q_proj.weight" in reader
    out = tmp_path / "merged.pth"
    code, _, err = run_cli(["merge", str(wrapped), "--method", "interpolation", "--layout", "beit3", "--out", str(out)])
    assert code == 0, err
    written = torch.load(out, weights_only=True)
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in written
    torch.testing.assert_close(written["language_head.weight"], state["language_head.weight"])


def test_regmean_on_beit3_collects_every_separate_projection(released, tmp_path):
    _, _, path = released
    model = load_model(path).eval()
    images, ids, mask = inputs()
    grams, info = collect_grams(model, [{"images": images}, {"text_ids": ids, "text_mask": mask}])
    for expert in ("v", "l"):
        for module in ("q_proj", "k_proj", "v_proj", "proj"):
            assert f"blocks.0.attn.{expert}.{module}" in grams
    assert info["blocks.2.mlp.l.fc2"]["tokens"] == int(mask.sum())
    # In a pair the text and image attend to each other; each expert's Gram matrix takes only its own tokens.
    paired, paired_info = collect_grams(model, [{"images": images, "text_ids": ids, "text_mask": mask}])
    assert paired_info["blocks.0.attn.v.q_proj"]["tokens"] == 2 * IMAGE_TOKENS
    assert paired_info["blocks.0.attn.l.q_proj"]["tokens"] == int(mask.sum())
    torch.testing.assert_close(paired["blocks.0.attn.v.q_proj"], grams["blocks.0.attn.v.q_proj"])  # layer 0: same input
    gram_file = tmp_path / "grams.safetensors"
    save_grams(gram_file, grams, info, {"checkpoint": {"path": str(path), "sha256": file_sha256(path)}})
    out = tmp_path / "regmean.pth"
    code, _, err = run_cli(
        ["merge", str(path), "--method", "regmean", "--grams", str(gram_file), "--layout", "beit3", "--out", str(out)]
    )
    assert code == 0, err
    _, BEiT3 = beit3_class()
    merged = BEiT3(released[1]).eval()
    merged.load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_a_forced_layout_that_does_not_fit_is_named(released):
    _, _, path = released
    with pytest.raises(CheckpointError, match="not in the vlmo layout"):
        open_checkpoint(path, "vlmo")


def test_keys_of_two_layouts_are_ambiguous_and_unknown_blocks_are_named():
    with pytest.raises(CheckpointError, match=r"several layouts \(native, beit3\); pass --input-layout"):
        detect_layout(["blocks.0.attn.v.qkv.weight", "encoder.layers.0.ffn.A.fc1.weight"])
    with pytest.raises(CheckpointError, match="no known layout.*layouts: native"):
        detect_layout(["model.layers.0.mlp.up_proj.weight"])


def test_save_checkpoint_of_a_beit3_state_reads_back_in_its_layout(released, tmp_path):
    reference, _, _ = released
    out = save_checkpoint(tmp_path / "beit3.safetensors", reference.state_dict())
    reader = open_checkpoint(out)
    assert reader.layout is Layout.BEIT3
    assert reader.shape("pos_embed") == (1, IMAGE_TOKENS + 2, 128)  # torchscale's (rows, width) table, batched


TORCHSCALE_SIZES = [("beit3-base", 12, 768, 12), ("beit3-large", 24, 1024, 16)]  # torchscale's own hyper-parameters


def test_every_registered_full_size_beit3_is_compared_with_torchscale():
    """Test-sized entries (under 224 pixels) have no torchscale counterpart; every other beit3 size must."""
    from vlmerge.models import MODEL_SIZES, model_config

    full = [
        name for name in MODEL_SIZES if model_config(name).family == "beit3" and model_config(name).image_size >= 224
    ]
    assert sorted(full) == sorted(size for size, *_ in TORCHSCALE_SIZES)


@pytest.mark.parametrize("size, layers, width, heads", TORCHSCALE_SIZES)
def test_registered_beit3_sizes_have_torchscales_keys_and_shapes(size, layers, width, heads):
    """The registered size, written in the beit3 layout, is exactly torchscale's BEiT3 of that size
    (both built on the meta device: shapes without memory)."""
    from vlmerge.io.layout import foreign_keys
    from vlmerge.models import create_model

    _, BEiT3 = beit3_class()
    config = beit3_config(
        img_size=224,
        patch_size=16,
        vocab_size=64010,
        encoder_embed_dim=width,
        encoder_attention_heads=heads,
        encoder_ffn_embed_dim=4 * width,
        encoder_layers=layers,
    )
    with torch.device("meta"):
        reference, ours = BEiT3(config), create_model(size)
    written = {
        name: tuple(value.shape[1:] if squeeze else value.shape)
        for key, value in ours.state_dict().items()
        for name, squeeze in foreign_keys(key, Layout.BEIT3)
    }
    assert written == {key: tuple(value.shape) for key, value in reference.state_dict().items()}


def test_a_layout_of_another_family_is_refused_before_any_work(released, tmp_path):
    _, _, path = released
    out = tmp_path / "merged.pth"
    code, _, err = run_cli(["merge", str(path), "--method", "interpolation", "--layout", "vlmo", "--out", str(out)])
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        f"vlmerge merge: error: {path}: a beit3 model cannot be written in the vlmo layout, which names another "
        "family's modules; write it as native, beit3"
    ]
