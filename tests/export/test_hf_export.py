"""Export of a merged image tower to transformers: features equal ours, weights in closed form, refusals."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # from_pretrained reads a local folder; nothing may be fetched

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

if not os.environ.get("CI"):  # CI installs it (the `hf` extra): absent there is a failure
    pytest.importorskip("transformers")
from transformers import BeitModel, ViTModel  # noqa: E402

from vlmerge.cli.main import main  # noqa: E402
from vlmerge.core.errors import CheckpointError, ConfigError, OutputError  # noqa: E402
from vlmerge.export import huggingface  # noqa: E402
from vlmerge.export.huggingface import export_architecture, export_hf, image_tower  # noqa: E402
from vlmerge.models import MODEL_SIZES, VLTransformer, load_model, model_config, save_model  # noqa: E402
from vlmerge.models.families import FAMILY_OPTIONS, family_config  # noqa: E402

TOLERANCE = 1e-5
WINDOW = 4  # micro: 32 px images of 8 px patches


def randomized(config, seed: int = 0) -> VLTransformer:
    """A model whose every parameter is off its init (zero biases, unit norms, equal layer scale)."""
    torch.manual_seed(seed)
    model = VLTransformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def images(config, count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, config.channels, config.image_size, config.image_size, generator=generator)


def our_features(model: VLTransformer, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images=pixels).hidden


def their_features(hf_model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(pixel_values=pixels).last_hidden_state


def beit_image_index(window: int) -> torch.Tensor:
    """BEiT's index of an image's (query, key) pairs, written out: patch offsets (dr, dc) at row
    (dr + w - 1) * (2w - 1) + (dc + w - 1), then cls->patch, patch->cls, cls->cls."""
    side, cells = 2 * window - 1, [(r, c) for r in range(window) for c in range(window)]
    index = torch.empty(len(cells) + 1, len(cells) + 1, dtype=torch.long)
    for i, (r1, c1) in enumerate(cells):
        for j, (r2, c2) in enumerate(cells):
            index[i + 1, j + 1] = (r1 - r2 + window - 1) * side + (c1 - c2 + window - 1)
    index[0, :], index[:, 0], index[0, 0] = side**2, side**2 + 1, side**2 + 2
    return index


VARIANTS = {  # ModelConfig overrides -> the class each exports to
    "native": ({}, ViTModel),
    "vit, separate q/k/v with a k bias, no layer scale, position offset": (
        {"qkv": "separate", "k_bias": True, "layer_scale": False, "position_offset": 2},
        ViTModel,
    ),
    "vit, no token types, no pooler": ({"token_types": False, "pooler": False}, ViTModel),
    "relative (paper, VLMo)": ({"position_bias": "relative", "image_positions": False}, BeitModel),
    "relative, separate q/k/v with a k bias, no layer scale, no token types": (
        {
            "position_bias": "relative",
            "image_positions": False,
            "qkv": "separate",
            "k_bias": True,
            "layer_scale": False,
            "token_types": False,
        },
        BeitModel,
    ),
    "relative and absolute positions": ({"position_bias": "relative"}, BeitModel),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_tower_loads_from_its_folder_and_gives_our_image_features(variant, tmp_path, capsys):
    overrides, hf_class = VARIANTS[variant]
    model = randomized(model_config("micro", layer_scale_init=1.0, **overrides).agnostic())
    path = save_model(model, tmp_path / "merged.safetensors")
    result = export_hf(path, tmp_path / "hf")
    assert result.architecture == hf_class.__name__
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "merged.safetensors"]  # no temporary left
    pooler = {} if model.config.pooler else {"add_pooling_layer": False}
    loaded, loading = hf_class.from_pretrained(tmp_path / "hf", output_loading_info=True, **pooler)
    assert not any(loading.values()), loading  # nothing missing, unexpected, mismatched or left random
    pixels = images(model.config)
    with torch.no_grad():
        ours, theirs = model(images=pixels), loaded.eval()(pixel_values=pixels)
    difference = (theirs.last_hidden_state - ours.hidden).abs().max().item()
    if hf_class is ViTModel and model.config.pooler:  # ours is ViT's pooler: carried
        torch.testing.assert_close(theirs.pooler_output, model.pool(ours), atol=TOLERANCE, rtol=0)
    with capsys.disabled():
        print(f"\n{variant}: {hf_class.__name__} max |difference| {difference:.2e}")
    assert difference <= TOLERANCE
    assert result.max_abs_difference <= TOLERANCE


@pytest.mark.parametrize("family", list(FAMILY_OPTIONS))
def test_every_family_merged_exports_or_is_refused_by_name(family, tmp_path):
    config = family_config(family, **MODEL_SIZES.get("micro"), placement="none")
    model = randomized(config)
    path = save_model(model, tmp_path / "merged.safetensors")
    if config.sub_ln:  # BEiT-3
        with pytest.raises(CheckpointError, match="cannot export a beit3 model.*sub-LN"):
            export_hf(path, tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
        return
    hf_class = BeitModel if config.position_bias == "relative" else ViTModel
    assert export_hf(path, tmp_path / "hf").architecture == hf_class.__name__
    pixels = images(config)
    loaded = hf_class.from_pretrained(tmp_path / "hf").eval()
    assert (their_features(loaded, pixels) - our_features(model, pixels)).abs().max().item() <= TOLERANCE


def test_vit_weights_fold_layer_scale_and_the_image_type_in_closed_form():
    model = randomized(model_config("micro", layer_scale_init=1.0).agnostic())
    tower = image_tower(model.config, model.state_dict()).state_dict()
    width, block = model.config.width, model.blocks[1]
    layer = {key.removeprefix("layers.1."): value for key, value in tower.items() if key.startswith("layers.1.")}
    torch.testing.assert_close(layer["attention.q_proj.weight"], block.attn.qkv.weight[:width])
    torch.testing.assert_close(layer["attention.k_proj.weight"], block.attn.qkv.weight[width : 2 * width])
    torch.testing.assert_close(layer["attention.v_proj.bias"], block.attn.v_bias)
    assert not layer["attention.k_proj.bias"].any()
    torch.testing.assert_close(layer["attention.o_proj.weight"], block.gamma_1[:, None] * block.attn.proj.weight)
    torch.testing.assert_close(layer["attention.o_proj.bias"], block.gamma_1 * block.attn.proj.bias)
    torch.testing.assert_close(layer["mlp.fc2.weight"], block.gamma_2[:, None] * block.mlp.fc2.weight)
    torch.testing.assert_close(layer["mlp.fc2.bias"], block.gamma_2 * block.mlp.fc2.bias)
    expected_positions = model.pos_embed + model.token_type_embed.weight[1]
    torch.testing.assert_close(tower["embeddings.position_embeddings"], expected_positions)


def test_vit_config_matches_ours():
    config = model_config("micro", norm_eps=1e-5, mlp_ratio=3.0).agnostic()
    hf_config = image_tower(config, VLTransformer(config).state_dict()).config
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads) == (32, 4, 2)
    assert (hf_config.intermediate_size, hf_config.layer_norm_eps, hf_config.hidden_act) == (96, 1e-5, "gelu")
    assert (hf_config.image_size, hf_config.patch_size, hf_config.num_channels) == (32, 8, 3)


def test_each_beit_layer_has_the_image_rows_of_the_shared_table_and_beits_index():
    config = model_config("micro", position_bias="relative", image_positions=False).agnostic()
    model = randomized(config)
    tower = image_tower(config, model.state_dict())
    table, heads, rows = model.relative_position_bias_table, config.heads, (2 * WINDOW - 1) ** 2 + 3
    assert table.shape[0] > rows  # the text and text<->image rows follow; not exported
    for layer, beit_layer in enumerate(tower.layers):
        own = beit_layer.relative_position_bias
        torch.testing.assert_close(own.relative_position_bias_table, table[:rows, layer * heads : (layer + 1) * heads])
        bias = own((WINDOW, WINDOW))[0]  # (heads, N, N) that BEiT adds to the logits
        expected = own.relative_position_bias_table[beit_image_index(WINDOW)].permute(2, 0, 1)
        torch.testing.assert_close(bias, expected)
    assert tower.layers[0].lambda_1 is not None and tower.config.use_mean_pooling is False


def test_a_merged_checkpoint_exports_through_the_cli(specific_model, tmp_path, capsys):
    with torch.no_grad():
        for param in specific_model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    source = save_model(specific_model, tmp_path / "specific.safetensors")
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(source), "--method", "interpolation", "--out", str(merged), "--quiet"]) == 0
    assert main(["export-hf", str(merged), "--out", str(tmp_path / "hf")]) == 0
    assert "ViTModel" in capsys.readouterr().out
    ours, pixels = load_model(merged).eval(), images(specific_model.config)
    theirs = ViTModel.from_pretrained(tmp_path / "hf").eval()
    assert (their_features(theirs, pixels) - our_features(ours, pixels)).abs().max().item() <= TOLERANCE
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "merged.safetensors" in readme and '"method": "interpolation"' in readme
    umask = os.umask(0o022)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()} == {0o666 & ~umask}
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(key).dtype == torch.float32 for key in weights.keys())


def test_a_multiway_checkpoint_is_refused_before_any_weight_is_read(specific_model, tmp_path, capsys):
    source = save_model(specific_model, tmp_path / "specific.safetensors")
    with pytest.raises(CheckpointError, match="merge it first"):
        export_hf(source, tmp_path / "hf")
    assert main(["export-hf", str(source), "--out", str(tmp_path / "hf")]) == 2
    assert "merge it first" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["specific.safetensors"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"sub_ln": True}, "sub-LN inside attention and FFN"),
        ({"sub_ln": True, "placement": "all"}, "merge it first.*sub-LN"),  # every problem, in one error
    ],
)
def test_what_no_transformers_class_expresses_is_one_error(overrides, named):
    config = model_config("micro", **{"placement": "none", **overrides})
    with pytest.raises(CheckpointError, match=named):
        export_architecture(config)


def test_experts_left_in_an_agnostic_state_are_refused(micro_config):
    config = micro_config.agnostic()
    state = VLTransformer(config).state_dict()
    state["blocks.0.attn.v.qkv.weight"] = state.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(CheckpointError, match="experts left in the weights.*merge"):
        image_tower(config, state)
    del state["blocks.0.attn.v.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['blocks.0.attn.qkv.weight'\]"):
        image_tower(config, state)


def test_an_output_folder_with_content_or_the_input_is_refused(tmp_path, capsys):
    path = save_model(VLTransformer(model_config("micro").agnostic()), tmp_path / "merged.safetensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists"):
        export_hf(path, tmp_path / "taken")
    with pytest.raises(ConfigError, match="is the input checkpoint"):
        export_hf(path, path)
    assert main(["export-hf", str(path), "--out", str(tmp_path / "taken")]) == 2
    assert "give a new (or empty) folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert export_hf(path, tmp_path / "empty", verify=False).max_abs_difference is None
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    path = save_model(VLTransformer(model_config("micro").agnostic()), tmp_path / "merged.safetensors")

    def full_disk(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ViTModel, "save_pretrained", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        export_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


def test_an_export_whose_features_differ_is_not_written(tmp_path, monkeypatch):
    path = save_model(randomized(model_config("micro").agnostic()), tmp_path / "merged.safetensors")
    wrong = huggingface._vit_weights

    def unfolded(config, state):  # layer scale forgotten
        weights = wrong(config, state)
        weights["layers.0.mlp.fc2.weight"] = state["blocks.0.mlp.fc2.weight"].clone()
        return weights

    monkeypatch.setattr(huggingface, "_vit_weights", unfolded)
    with pytest.raises(CheckpointError, match="differs from our image features"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_older_transformers_is_one_clear_error(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    config = model_config("micro").agnostic()
    with pytest.raises(ConfigError, match=r"needs transformers>=5 \(found 4.46.3\)"):
        image_tower(config, VLTransformer(config).state_dict())
