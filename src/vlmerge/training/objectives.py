"""Pre-training objectives, as functions of the model, heads and a batch.

- ITC: image-text contrastive over the dual encoder (v path for images, l path for text);
- ITC-vl: the same on unimodal inputs run through the vl experts, with its own projections
  and temperature, so the vl experts also learn from each modality alone;
- ITM: binary matching on the fused output, with hard negatives drawn from the contrastive
  similarities;
- MLM: whole-word masked text, predicted from the fused image-text output.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.data.masking import IGNORE_INDEX, whole_word_mask
from vlmerge.data.tokenizer import TokenBatch
from vlmerge.models.heads import PretrainingHeads
from vlmerge.models.transformer import VLTransformer
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext

MAX_LOGIT_SCALE = 100.0


class ObjectiveWeights(StrictConfig):
    itc: FiniteFloat = Field(1.0, ge=0)
    itc_vl: FiniteFloat = Field(1.0, ge=0)
    itm: FiniteFloat = Field(1.0, ge=0)
    mlm: FiniteFloat = Field(1.0, ge=0)
    mask_probability: FiniteFloat = Field(
        0.25, gt=0, lt=1, description="fraction of words masked for MLM (paper: 25 %)"
    )


@dataclass
class PairBatch:
    images: torch.Tensor  # (B, C, H, W)
    text: TokenBatch

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> "PairBatch":
        return PairBatch(self.images[rows], self.text[rows])

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.images.to(device), self.text.to(device))


def contrastive_logits(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, B) image-to-text similarities of L2-normalised embeddings, scaled by exp(logit_scale)."""
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    return scale * F.normalize(image_embed, dim=-1) @ F.normalize(text_embed, dim=-1).T


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: matching pairs lie on the diagonal."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def sample_hard_negatives(
    logits: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a non-matching text, and for each text a non-matching image, drawn in
    proportion to their similarity (harder negatives more often); never the positive."""
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    weights_i2t = logits.detach().float().softmax(dim=1).masked_fill(eye, 0) + 1e-12 * ~eye
    weights_t2i = logits.detach().float().T.softmax(dim=1).masked_fill(eye, 0) + 1e-12 * ~eye
    text_for_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    image_for_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return text_for_image, image_for_text


def itm_loss(
    model: VLTransformer,
    heads: PretrainingHeads,
    batch: PairBatch,
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    dist: DistributedContext = SINGLE_PROCESS,
) -> torch.Tensor:
    """This rank's positives plus one hard negative text per image and one hard negative image
    per text, drawn from the global batch (`logits` is global; every rank draws the same)."""
    text_for_image, image_for_text = sample_hard_negatives(logits, generator)
    rows = dist.rows(len(batch))
    ids, mask = batch.text.ids, batch.text.mask
    images = torch.cat([batch.images[rows], batch.images[rows], batch.images[image_for_text[rows]]])
    text_ids = torch.cat([ids[rows], ids[text_for_image[rows]], ids[rows]])
    text_mask = torch.cat([mask[rows], mask[text_for_image[rows]], mask[rows]])
    size = images.shape[0] // 3
    labels = torch.cat([torch.ones(size), torch.zeros(2 * size)]).long().to(logits.device)
    fused = model(images=images, text_ids=text_ids, text_mask=text_mask)
    return F.cross_entropy(heads.itm(model.pool(fused)), labels)


def mlm_loss(
    model: VLTransformer,
    heads: PretrainingHeads,
    batch: PairBatch,
    mask_probability: float,
    mask_id: int,
    generator: torch.Generator | None = None,
    dist: DistributedContext = SINGLE_PROCESS,
) -> torch.Tensor:
    """Masks are drawn for the global batch, so they do not depend on the number of ranks."""
    vocab_size = heads.mlm[-1].out_features
    inputs, labels = whole_word_mask(batch.text, mask_probability, mask_id, vocab_size, generator)
    rows = dist.rows(len(batch))
    inputs, labels = inputs[rows], labels[rows]
    fused = model(images=batch.images[rows], text_ids=inputs, text_mask=batch.text.mask[rows])
    text_hidden = fused.hidden[:, : fused.num_text_tokens]  # text leads the fused sequence
    total = F.cross_entropy(
        heads.mlm(text_hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return dist.global_mean(total, (labels != IGNORE_INDEX).sum())


def pretraining_losses(
    model: VLTransformer,
    heads: PretrainingHeads,
    batch: PairBatch,
    weights: ObjectiveWeights,
    mask_id: int,
    generator: torch.Generator | None = None,
    dist: DistributedContext = SINGLE_PROCESS,
) -> dict[str, torch.Tensor]:
    """Every enabled objective on one global batch (this rank computes its rows), plus their
    weighted sum under 'loss'."""
    local = batch[dist.rows(len(batch))]
    image_out = model(images=local.images)
    text_out = model(text_ids=local.text.ids, text_mask=local.text.mask)
    logits = contrastive_logits(
        dist.gather(heads.itc_image(image_out.cls)), dist.gather(heads.itc_text(text_out.cls)), heads.logit_scale
    )
    losses = {"itc": contrastive_loss(logits)}
    if weights.itc_vl:
        image_vl = model(images=local.images, unimodal_through_vl=True)
        text_vl = model(text_ids=local.text.ids, text_mask=local.text.mask, unimodal_through_vl=True)
        vl_logits = contrastive_logits(
            dist.gather(heads.itc_vl_image(image_vl.cls)),
            dist.gather(heads.itc_vl_text(text_vl.cls)),
            heads.vl_logit_scale,
        )
        losses["itc_vl"] = contrastive_loss(vl_logits)
    if weights.itm:
        losses["itm"] = itm_loss(model, heads, batch, logits, generator, dist)
    if weights.mlm:
        losses["mlm"] = mlm_loss(model, heads, batch, weights.mask_probability, mask_id, generator, dist)
    losses["loss"] = sum(getattr(weights, name) * value for name, value in losses.items())
    return losses


class PretrainingObjective(nn.Module):
    """Model, heads and losses as one module, so DistributedDataParallel sees one forward per step."""

    def __init__(
        self,
        model: VLTransformer,
        heads: PretrainingHeads,
        weights: ObjectiveWeights,
        mask_id: int,
        dist: DistributedContext = SINGLE_PROCESS,
    ) -> None:
        super().__init__()
        self.model, self.heads = model, heads
        self.weights, self.mask_id, self.dist = weights, mask_id, dist

    def forward(self, batch: PairBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return pretraining_losses(self.model, self.heads, batch, self.weights, self.mask_id, generator, self.dist)
