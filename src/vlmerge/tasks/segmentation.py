"""Semantic segmentation, vision-only: a class for every pixel, from the patch tokens of some blocks.

Images go through the vision experts in every layer (`model(images=...)`); the head reads the patch
grids of chosen blocks. Fine-tuning trains BEiT's UperNet head over four blocks spread by depth (an
auxiliary FCN's loss weighted 0.4); the linear probe trains DINOv2's linear head (BatchNorm and a 1x1
convolution) on the last block. Logits are upsampled bilinearly to the labels; cross-entropy skips
IGNORE_LABEL pixels.

The primary metric is mmsegmentation's mIoU: per class, intersections and unions summed over the whole
split, IoU = intersection / union, averaged over the classes with a non-empty union (a class predicted
but absent from the labels counts as 0; one neither predicted nor present is left out). Its samples keep
each image's counts together: `counts` is one array of 2 x classes rows (intersections, then unions) by
images, so a bootstrap that resamples the last axis with one set of indices resamples whole images.
"""

import numpy as np
import torch
from torch import nn

from vlmerge.core.modality import Modality
from vlmerge.data.sources import IGNORE_LABEL, DataSource, ImageStore
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.models.config import ModelConfig
from vlmerge.models.heads import LinearSegmentationHead, UperNetHead, resize, segmentation_blocks
from vlmerge.models.multiway import select_expert
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, Evaluation, Examples, Samples, Task, evaluation_mode, to_device
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext

AUX_WEIGHT = 0.4  # the auxiliary FCN's share of the loss, as in BEiT's UperNet


def patch_features(model: VLTransformer, images: torch.Tensor, blocks: tuple[int, ...], normed: bool):
    """(B, D, h, w) patch grids after each of `blocks` (images through the vision experts), through the
    model's final vision norm when `normed`."""
    found: dict[int, torch.Tensor] = {}
    hooks = [
        model.blocks[index].register_forward_hook(lambda _m, _a, out, index=index: found.__setitem__(index, out))
        for index in sorted(set(blocks))
    ]
    try:
        model(images=images)
    finally:
        for hook in hooks:
            hook.remove()
    norm = select_expert(model.norm, Modality.V) if normed else nn.Identity()
    side = model.config.image_size // model.config.patch_size
    # (B, 1 + h*w, D) -> drop the cls token -> (B, D, h, w)
    return [norm(found[index])[:, 1:].transpose(1, 2).reshape(len(images), -1, side, side) for index in blocks]


def dense_logits(model: VLTransformer, head: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return head(patch_features(model, images, head.blocks, head.normed))


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (0 for a batch with none), logits upsampled to the labels."""
    total = nn.functional.cross_entropy(
        resize(logits, labels.shape[-2:]), labels, ignore_index=IGNORE_LABEL, reduction="sum"
    )
    return total / (labels != IGNORE_LABEL).sum().clamp(min=1)


def image_counts(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, H, W) predicted and true classes; (B, 2 x classes) per image: the intersection of each class's
    prediction and label, then their union, over the labelled pixels only (as mmsegmentation counts)."""
    batch = len(labels)
    valid = labels != IGNORE_LABEL
    offsets = torch.arange(batch, device=labels.device)[:, None, None] * classes

    def per_image(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return torch.bincount((values + offsets)[where], minlength=batch * classes).reshape(batch, classes)

    intersection = per_image(labels, valid & (predictions == labels))
    union = per_image(predictions, valid) + per_image(labels, valid) - intersection
    return torch.cat([intersection, union], dim=1)


def mean_iou(counts: np.ndarray, axis: int = -1) -> float | np.ndarray:
    """mIoU from per-image counts: (2 x classes, ..., images) with images along `axis` (not the first);
    the counts are summed over images first. NaN where no class has a non-empty union."""
    totals = np.moveaxis(np.asarray(counts, dtype=np.float64), axis, -1).sum(axis=-1)
    classes = totals.shape[0] // 2
    intersection, union = totals[:classes], totals[classes:]
    present = union > 0
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=present)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = iou.sum(axis=0) / present.sum(axis=0)
    return float(value) if np.ndim(value) == 0 else value


@TASKS.register_class
class SemanticSegmentation(Task):
    """Vision-only: the class of every pixel (ADE20k style). Opt-in: named by studies that want it."""

    name = "segmentation"
    use = "segments"
    primary_metric = "miou"
    opt_in = True

    def __init__(self, source: DataSource, tokenizer: TextTokenizer, seed: int = 0) -> None:
        super().__init__(source, tokenizer, seed)
        self._masks: dict[str, ImageStore] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source.segments("train").classes

    def build_examples(self, split: str) -> tuple[ImageStore, Examples]:
        segmented = self.source.segments(split)
        self._masks[split] = segmented.masks
        rows = torch.arange(len(segmented))
        return segmented.images, {"images": rows, "masks": rows}

    def batch(self, split: str, rows: slice | torch.Tensor) -> Examples:
        """Images as the model takes them, and `labels`: (n, S, S) long, a class or IGNORE_LABEL per pixel."""
        batch = super().batch(split, rows)
        batch["labels"] = self._masks[split][batch.pop("masks")].long()
        return batch

    def make_head(self, config: ModelConfig) -> nn.Module:
        grid = config.image_size // config.patch_size
        return UperNetHead(config.width, len(self.classes), segmentation_blocks(config.depth), grid)

    def make_probe_head(self, config: ModelConfig) -> nn.Module:
        return LinearSegmentationHead(config.width, len(self.classes), segmentation_blocks(config.depth, 1))

    def loss(
        self, model: VLTransformer, head: nn.Module, batch: Examples, dist: DistributedContext = SINGLE_PROCESS
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy of the head's logits (plus AUX_WEIGHT x the auxiliary head's) on this rank's rows."""
        logits = dense_logits(model, head, batch["images"])
        losses = {name: segmentation_loss(value, batch["labels"]) for name, value in logits.items()}
        total = losses["decode"] + AUX_WEIGHT * losses["aux"] if "aux" in losses else losses["decode"]
        return {"loss": total, **{f"{name}_loss": value for name, value in losses.items() if name != "decode"}}

    @torch.no_grad()
    def evaluate(self, model: VLTransformer, head: nn.Module, split: str = "test", batch_size: int = 128) -> Evaluation:
        device = next(model.parameters()).device
        classes = len(self.classes)
        chunks = []
        with evaluation_mode(model, head):
            for start in range(0, self.num_examples(split), batch_size):
                batch = to_device(self.batch(split, slice(start, start + batch_size)), device)
                logits = resize(dense_logits(model, head, batch["images"])["decode"], batch["labels"].shape[-2:])
                chunks.append(image_counts(logits.argmax(dim=1), batch["labels"], classes).cpu())
        counts = torch.cat(chunks).T.double().numpy()  # (2 x classes, images)
        return Evaluation(segmentation_metrics(counts), {"counts": counts.tolist()})

    @staticmethod
    def primary_statistic(samples: Samples, axis: int = -1) -> float | np.ndarray:
        """mIoU of `counts`, (2 x classes, ..., images): resample axes (if any) between the count rows and
        the images, which lie along `axis`."""
        return mean_iou(samples["counts"], axis)


def segmentation_metrics(counts: np.ndarray) -> dict[str, float]:
    """mIoU and pixel accuracy (labelled pixels predicted right) of (2 x classes, images) counts."""
    totals = counts.sum(axis=-1)
    classes = len(totals) // 2
    labelled = _labelled_pixels(totals)
    return {
        "miou": mean_iou(counts),
        "pixel_accuracy": float(totals[:classes].sum() / labelled) if labelled else float("nan"),
    }


def _labelled_pixels(totals: np.ndarray) -> float:
    """Labelled pixels: each is in its class's union once, and the predicted class's too when it differs,
    so sum(union) = labelled + wrong = 2 x labelled - sum(intersection)."""
    classes = len(totals) // 2
    return float((totals[classes:].sum() + totals[:classes].sum()) / 2)
