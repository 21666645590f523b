"""Semantic segmentation: mIoU against an independent count, per-image samples that a bootstrap resamples
whole, the heads' shapes, and fine-tuning and probing on packaged clip-art scenes (with resume)."""

import numpy as np
import pytest
import torch
from scipy import stats

from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.models import create_model
from vlmerge.models.checkpoint import load_head_state, load_model, save_model
from vlmerge.models.heads import LinearSegmentationHead, UperNetHead, segmentation_blocks
from vlmerge.tasks import DEFAULT_TASKS, TASKS
from vlmerge.tasks.finetune import TASK_HEAD, evaluate_checkpoint, read_evaluation, run_finetune
from vlmerge.tasks.segmentation import (
    SemanticSegmentation,
    image_counts,
    mean_iou,
    patch_features,
    segmentation_metrics,
)
from vlmerge.training.config import parse_stage_config

IGNORE = 255


def numpy_miou(predictions: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """mmsegmentation's mIoU, written out: class by class over every labelled pixel of the dataset."""
    valid = labels != IGNORE
    ious = []
    for c in range(classes):
        predicted, true = (predictions == c) & valid, (labels == c) & valid
        union = np.logical_or(predicted, true).sum()
        if union:
            ious.append(np.logical_and(predicted, true).sum() / union)
    return float(np.mean(ious))


def random_maps(seed: int, images: int = 12, classes: int = 6, side: int = 9):
    """Labels that never use the last class, with ignored pixels; predictions right about half the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, (images, side, side))
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    predictions = np.where(rng.random(labels.shape) < 0.5, labels, rng.integers(0, classes, labels.shape))
    predictions[predictions == IGNORE] = 0
    return predictions, labels, classes


@pytest.mark.parametrize("seed", range(3))
def test_miou_equals_an_independent_count(seed):
    predictions, labels, classes = random_maps(seed)
    counts = image_counts(torch.from_numpy(predictions), torch.from_numpy(labels), classes).T.double().numpy()
    assert counts.shape == (2 * classes, len(labels))
    metrics = segmentation_metrics(counts)
    assert metrics["miou"] == pytest.approx(numpy_miou(predictions, labels, classes), rel=1e-12)
    valid = labels != IGNORE
    assert metrics["pixel_accuracy"] == pytest.approx((predictions == labels)[valid].mean(), rel=1e-12)
    # Not the mean of per-image mIoUs: the counts are summed over the dataset first.
    per_image = np.mean([numpy_miou(p[None], t[None], classes) for p, t in zip(predictions, labels)])
    assert metrics["miou"] != pytest.approx(per_image, rel=1e-9)


def test_a_class_neither_labelled_nor_predicted_is_left_out_and_a_wrong_one_scores_zero():
    labels = np.array([[[0, 0], [1, IGNORE]]])
    predictions = np.array([[[0, 2], [1, 3]]])  # class 2 predicted on a labelled pixel, 3 on an ignored one
    counts = image_counts(torch.from_numpy(predictions), torch.from_numpy(labels), 5).T.numpy()
    assert mean_iou(counts) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_bootstrap_over_images_keeps_each_images_counts_together():
    predictions, labels, classes = random_maps(0, images=20)
    counts = image_counts(torch.from_numpy(predictions), torch.from_numpy(labels), classes).T.double().numpy()
    columns = {tuple(column) for column in counts.T}
    seen = []

    def statistic(resampled, axis=-1):
        seen.append(resampled)
        return SemanticSegmentation.primary_statistic({"counts": resampled}, axis=axis)

    interval = stats.bootstrap(
        (counts,), statistic, axis=-1, vectorized=True, n_resamples=50, method="percentile", rng=0
    ).confidence_interval
    assert 0.0 < interval.low <= mean_iou(counts) <= interval.high < 1.0
    resampled = seen[0]
    assert resampled.shape == (2 * classes, 50, 20)  # count rows, resamples, images
    # Every resampled image is one original image's column: its intersections and unions moved together.
    assert all(tuple(resampled[:, r, i]) in columns for r in range(50) for i in range(20))
    one_by_one = [mean_iou(resampled[:, r]) for r in range(5)]
    np.testing.assert_allclose(statistic(resampled)[:5], one_by_one, rtol=1e-12)


def test_segmentation_is_opt_in():
    assert "segmentation" in TASKS and TASKS.get("segmentation") is SemanticSegmentation
    assert "segmentation" not in list(TASKS) and "segmentation" not in DEFAULT_TASKS
    assert "segmentation" in TASKS.all_names() and list(TASKS) == TASKS.names()


@pytest.mark.parametrize("depth", [1, 2, 4, 12])
def test_heads_turn_the_patch_grid_into_logits(depth):
    width, classes, grid = 16, 5, 8
    features = [torch.randn(2, width, grid, grid) for _ in range(4)]
    upernet = UperNetHead(width, classes, segmentation_blocks(depth), grid)
    out = upernet(features)
    assert out["decode"].shape == (2, classes, 4 * grid, 4 * grid) and out["aux"].shape == (2, classes, grid, grid)
    assert upernet.pool_scales == (1, 2, 3)  # 6 does not fit the 4 x 4 coarsest level
    assert "aux" not in upernet.eval()(features)
    linear = LinearSegmentationHead(width, classes, segmentation_blocks(depth, 1))
    assert linear(features[:1])["decode"].shape == (2, classes, grid, grid)


def test_patch_features_are_the_vision_route_block_outputs():
    torch.manual_seed(0)
    model = create_model("micro").eval()
    images = torch.randn(2, 3, 32, 32)
    last = patch_features(model, images, (model.config.depth - 1,), normed=True)[0]
    expected = model(images=images).hidden[:, 1:]  # every layer through the vision experts
    assert torch.allclose(last.flatten(2).transpose(1, 2), expected, atol=1e-6)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train(["a picture", "a scene of clip art"], vocab_size=64, max_len=24)
    path = tmp_path_factory.mktemp("segmentation") / "micro.safetensors"
    return save_model(create_model("micro"), path, step=0, extra_metadata={"tokenizer": tokenizer.to_json()})


def finetune_config(checkpoint, cache_dir, **fields) -> dict:
    return {
        "task": "segmentation",
        "init": str(checkpoint),
        "steps": 4,
        "checkpoint_every": 2,
        "eval_batch_size": 8,
        "data": {"dataset": "stamp_scenes", "image_size": 32, "limit": 16, "cache_dir": str(cache_dir)},
        "optimizer": {"batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        **fields,
    }


def test_finetune_trains_evaluates_and_resumes_to_the_same_weights(micro_checkpoint, tmp_path, monkeypatch):
    config = parse_stage_config("finetune", finetune_config(micro_checkpoint, tmp_path / "cache"))
    evaluation = run_finetune(config, tmp_path / "whole", progress=False)
    assert 0.0 <= evaluation.metrics["miou"] <= 1.0 and 0.0 <= evaluation.metrics["pixel_accuracy"] <= 1.0
    assert SemanticSegmentation.primary_statistic(evaluation.samples) == pytest.approx(evaluation.metrics["miou"])
    assert read_evaluation(tmp_path / "whole") == evaluation  # nested per-image counts survive results.json

    calls = {"n": 0}
    loss = SemanticSegmentation.loss

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(SemanticSegmentation, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(SemanticSegmentation, "loss", loss)
    resumed = run_finetune(config, tmp_path / "resumed", progress=False)
    assert resumed == evaluation
    whole, again = (open_checkpoint(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert whole.keys == again.keys and all(torch.equal(whole.get(key), again.get(key)) for key in whole.keys)
    assert evaluate_checkpoint(tmp_path / "whole" / "model.safetensors", split="test", data=config.data) == evaluation


def test_probe_trains_a_linear_head_and_leaves_the_model_as_it_was(micro_checkpoint, tmp_path):
    config = parse_stage_config(
        "finetune", finetune_config(micro_checkpoint, tmp_path / "cache", freeze_backbone=True, steps=2)
    )
    evaluation = run_finetune(config, tmp_path / "probe", progress=False)
    saved = tmp_path / "probe" / "model.safetensors"
    head = load_head_state(saved, TASK_HEAD)
    assert {key.split(".")[0] for key in head} == {"norm", "classify"}  # BatchNorm + 1x1 conv
    before, after = load_model(micro_checkpoint), load_model(saved)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert evaluate_checkpoint(saved, split="test", data=config.data) == evaluation  # the probe head is found again
