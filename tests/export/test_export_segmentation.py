"""Export of a segmentation-fine-tuned merged model to BeitForSemanticSegmentation: its logits equal the
task's, every head tensor lands on BEiT's by name, and every head BEiT cannot express is refused."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # from_pretrained reads a local folder; nothing may be fetched

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

if not os.environ.get("CI"):  # CI installs it (the `hf` extra): absent there is a failure
    pytest.importorskip("transformers")
from transformers import BeitForSemanticSegmentation, BeitModel  # noqa: E402

from vlmerge.cli.main import main  # noqa: E402
from vlmerge.core.errors import CheckpointError  # noqa: E402
from vlmerge.data.sources import IGNORE_LABEL  # noqa: E402
from vlmerge.export import segmentation  # noqa: E402
from vlmerge.export.huggingface import export_hf  # noqa: E402
from vlmerge.models import MODEL_SIZES, VLTransformer, load_model, model_config, save_model  # noqa: E402
from vlmerge.models.families import FAMILY_OPTIONS, family_config  # noqa: E402
from vlmerge.models.heads import LinearSegmentationHead, UperNetHead, segmentation_blocks  # noqa: E402
from vlmerge.tasks import finetune  # noqa: E402
from vlmerge.tasks.segmentation import AUX_WEIGHT, SemanticSegmentation, dense_logits, patch_features  # noqa: E402

TOLERANCE = 1e-5
CLASSES = 5
RELATIVE = {"position_bias": "relative", "image_positions": False, "layer_scale_init": 1.0}


def randomized(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Every parameter off its init, and BatchNorm statistics as training leaves them (not 0 and 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn_like(param))
        for norm in module.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.normal_(0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
                norm.num_batches_tracked.fill_(7)
    return module.eval()


def task_head(config, **options) -> UperNetHead:
    """The head the segmentation task fine-tunes (`make_head`), or one built with other `options`."""
    grid = config.image_size // config.patch_size
    return UperNetHead(config.width, CLASSES, segmentation_blocks(config.depth), grid, **options)


def finetuned(tmp_path, config, head: nn.Module | None = None, task: str | None = "segmentation"):
    """A merged model with a fine-tuned-like head, saved as `run_finetune` saves it; (model, head, path)."""
    model = randomized(VLTransformer(config), seed=0)
    head = randomized(head if head is not None else task_head(config), seed=1, scale=0.1)
    metadata = {"stage": "finetune"} | ({"task": task} if task else {})
    path = save_model(model, tmp_path / "finetuned.safetensors", 10, metadata, heads={finetune.TASK_HEAD: head})
    return model, head, path


def images(config, count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, config.channels, config.image_size, config.image_size, generator=generator)


def their_feature_maps(exported, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four maps BeitForSemanticSegmentation feeds its heads, computed as its forward does."""
    hidden = exported.beit(pixel_values=pixels, output_hidden_states=True).hidden_states
    side = exported.config.image_size // exported.config.patch_size
    maps = tuple(
        hidden[i - 1][:, 1:].transpose(1, 2).reshape(len(pixels), -1, side, side) for i in exported.config.out_indices
    )
    return exported.fpn(maps)


@pytest.mark.parametrize("family", list(FAMILY_OPTIONS))
def test_every_family_exports_the_task_logits_or_is_refused_by_name(family, tmp_path, capsys):
    config = family_config(family, **MODEL_SIZES.get("micro"), placement="none")
    model, head, path = finetuned(tmp_path, config)
    if config.position_bias != "relative":  # native (ViT), BEiT-3
        named = "sub-LN" if config.sub_ln else "absolute image positions export to ViTModel"
        with pytest.raises(CheckpointError, match=named):
            export_hf(path, tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
        return
    result = export_hf(path, tmp_path / "hf")
    assert result.architecture == "BeitForSemanticSegmentation" and result.max_abs_difference <= TOLERANCE
    loaded, loading = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading.values()), loading  # nothing missing, unexpected, mismatched or left random
    pixels = images(config)
    with torch.no_grad():
        ours, theirs = dense_logits(model, head, pixels)["decode"], loaded.eval()(pixel_values=pixels).logits
        difference = (ours - theirs).abs().max().item()
        assert ours.shape == (3, CLASSES, 16, 16)  # 4x the 4x4 patch grid
        # the auxiliary FCN (training only, in both): on the third block's grid
        our_aux = head.aux(patch_features(model, pixels, head.blocks, normed=False)[2])
        their_aux = loaded.auxiliary_head(their_feature_maps(loaded, pixels))
        # the identity layer past ours leaves the tower's features as they are
        hidden = loaded.beit(pixel_values=pixels).last_hidden_state
    with capsys.disabled():
        print(f"\n{family}: BeitForSemanticSegmentation max |logit difference| {difference:.2e}")
    assert difference <= TOLERANCE
    torch.testing.assert_close(their_aux, our_aux, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(hidden, model(images=pixels).hidden, atol=TOLERANCE, rtol=0)
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "out_indices` [2, 3, 4, 5]" in readme and "Layer 4 is an exact identity" in readme


def test_every_head_tensor_lands_on_beits_by_name_and_the_config_is_ours(tmp_path):
    config = model_config("micro", **RELATIVE).agnostic()
    model, head = randomized(VLTransformer(config), 0), randomized(task_head(config), 1)
    plan = segmentation.SegmentationPlan(CLASSES, config.width, head.blocks, head.pool_scales)
    exported = segmentation.segmentation_model(config, model.state_dict(), head, plan)
    theirs = exported.state_dict()
    expected = {
        "pyramid.0.0.weight": "fpn.fpn1.conv_transpose1.weight",
        "pyramid.0.1.running_var": "fpn.fpn1.normalization.running_var",
        "pyramid.0.3.bias": "fpn.fpn1.conv_transpose2.bias",
        "pyramid.1.weight": "fpn.fpn2.weight",
        "ppm.1.1.0.weight": "decode_head.psp_modules.blocks.1.conv.convolution.weight",
        "ppm.0.1.1.running_mean": "decode_head.psp_modules.blocks.0.conv.normalization.running_mean",
        "ppm_bottleneck.1.weight": "decode_head.psp_bottleneck.normalization.weight",
        "lateral.2.0.weight": "decode_head.lateral_convs.2.convolution.weight",
        "fpn.0.1.bias": "decode_head.fpn_convs.0.normalization.bias",
        "fuse.0.weight": "decode_head.fpn_bottleneck.convolution.weight",
        "classify.bias": "decode_head.classifier.bias",
        "aux.0.1.num_batches_tracked": "auxiliary_head.convs.0.normalization.num_batches_tracked",
        "aux.1.weight": "auxiliary_head.classifier.weight",
    }
    for ours, name in expected.items():
        assert segmentation.head_key(ours) == name
    for ours, value in head.state_dict().items():
        assert torch.equal(theirs[segmentation.head_key(ours)], value), ours
    hf_config = exported.config
    assert list(hf_config.out_indices) == [block + 2 for block in head.blocks] == [2, 3, 4, 5]
    assert hf_config.num_hidden_layers == config.depth + 1
    assert tuple(hf_config.pool_scales) == head.pool_scales == (1, 2)  # (1, 2, 3, 6) cut to the 2x2 coarsest grid
    assert (hf_config.num_labels, hf_config.auxiliary_channels, hf_config.auxiliary_num_convs) == (CLASSES, 32, 1)
    assert (hf_config.semantic_loss_ignore_index, hf_config.auxiliary_loss_weight) == (IGNORE_LABEL, AUX_WEIGHT)
    pad = {
        key.removeprefix("beit.layers.4."): value for key, value in theirs.items() if key.startswith("beit.layers.4.")
    }
    assert not pad["attention.o_proj.weight"].any() and not pad["mlp.fc2.bias"].any()


def test_the_constants_restated_below_tasks_are_the_tasks_own():
    assert segmentation.TASK_HEAD == finetune.TASK_HEAD
    assert segmentation.SEGMENTATION_TASK == SemanticSegmentation.name
    assert (segmentation.AUX_WEIGHT, segmentation.IGNORE_LABEL) == (AUX_WEIGHT, IGNORE_LABEL)
    config = model_config("micro", **RELATIVE)
    built = SemanticSegmentation.make_head(SimpleNamespace(classes=tuple("abcde")), config)
    ours = segmentation._task_head(config, CLASSES, config.width)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert (built.blocks, built.pool_scales, built.normed) == (ours.blocks, ours.pool_scales, False)


def test_a_merged_checkpoint_keeps_its_head_and_exports_through_the_cli(tmp_path, capsys):
    """A multiway model fine-tuned for segmentation, merged: the merged file has no task in its metadata,
    and its head (carried through the merge) is known by its per-pixel classifier."""
    config = model_config("micro", **RELATIVE)
    assert config.is_multiway
    _, head, source = finetuned(tmp_path, config)
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(source), "--method", "interpolation", "--out", str(merged), "--quiet"]) == 0
    assert main(["export-hf", str(merged), "--out", str(tmp_path / "hf")]) == 0
    assert "BeitForSemanticSegmentation" in capsys.readouterr().out
    exported = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    ours, pixels = load_model(merged).eval(), images(config)
    with torch.no_grad():
        difference = (dense_logits(ours, head, pixels)["decode"] - exported(pixel_values=pixels).logits).abs().max()
    assert difference.item() <= TOLERANCE
    assert '"method": "interpolation"' in (tmp_path / "hf" / "README.md").read_text()


REFUSED = {  # (config overrides, head, what the error names)
    "the linear probe": (RELATIVE, lambda c: LinearSegmentationHead(c.width, CLASSES, (c.depth - 1,)), "linear probe"),
    "narrower channels": (RELATIVE, lambda c: task_head(c, channels=16), "16 channels wide.*as wide as the model"),
    "other pool scales": (RELATIVE, lambda c: task_head(c, pool_scales=(1,)), r"pool scales \(1, 2\).*missing"),
    "depth 3": ({**RELATIVE, "depth": 3}, task_head, r"blocks \(0, 1, 1, 2\).*out_indices must differ"),
    "absolute positions and the probe, in one error": (
        {},
        lambda c: LinearSegmentationHead(c.width, CLASSES, (c.depth - 1,)),
        "ViTModel.*linear probe",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_head_beit_cannot_express_is_refused_before_the_weights_are_read(case, tmp_path):
    overrides, make_head, named = REFUSED[case]
    config = model_config("micro", **overrides).agnostic()
    _, _, path = finetuned(tmp_path, config, make_head(config))
    with pytest.raises(CheckpointError, match=f"cannot export the segmentation model.*{named}.*task_head=False"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    tower = export_hf(path, tmp_path / "tower", task_head=False)  # the image tower alone still exports
    assert tower.architecture == ("BeitModel" if config.position_bias == "relative" else "ViTModel")


def test_another_tasks_head_leaves_the_tower_export_as_it_was(tmp_path):
    config = model_config("micro", **RELATIVE).agnostic()
    _, _, path = finetuned(tmp_path, config, nn.Linear(config.width, CLASSES), task="image_classification")
    assert export_hf(path, tmp_path / "hf").architecture == "BeitModel"
    assert "task heads" in (tmp_path / "hf" / "README.md").read_text()  # named as not exported
    BeitModel.from_pretrained(tmp_path / "hf")


def test_a_wrong_choice_of_hidden_states_is_caught_before_writing(tmp_path, monkeypatch):
    config = model_config("micro", **RELATIVE).agnostic()
    _, _, path = finetuned(tmp_path, config)
    monkeypatch.setattr(segmentation, "FIRST_OUT_INDEX", 1)  # block b read from hidden_states[b]: one block early
    with pytest.raises(CheckpointError, match="differs from our segmentation logits"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
