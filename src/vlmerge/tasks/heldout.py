"""The pre-training objectives on held-out pairs, one value per pair: what a model keeps of what it
learnt, measured with no training after it (so a merge is scored without the noise of fine-tuning).

Every model of a study is scored on the same pairs with the same draws, so two models' values pair up
example by example: the pairs in their split's order, cut into fixed batches; the contrastive losses
score each pair against the others of its batch; the matching loss pairs each image with the next
pair's text and each text with the next pair's image (fixed negatives: hard negatives drawn from a
model's own similarities would differ between the models compared); masked-token loss masks words
drawn from a generator seeded by the batch's index, every chosen word replaced by [MASK] and at least
one word per caption. Per pair:

- itc, itc_vl: the symmetric InfoNCE of the pair (image-to-text and text-to-image rows, averaged);
- itm: the mean cross-entropy of its positive and its two negatives;
- mlm: the mean cross-entropy over its masked tokens;
- loss: the objectives' weighted sum (the weights of the recipe, the same for every model);
- i2t_correct: whether the image's nearest text in its batch is its own; itm_correct: the share of
  its three matching decisions that are right.
"""

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vlmerge.core.threads import one_thread
from vlmerge.data.config import DataConfig
from vlmerge.data.masking import IGNORE_INDEX
from vlmerge.data.sources import load_pairs
from vlmerge.data.tokenizer import TokenBatch
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.models.heads import PretrainingHeads
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import Evaluation
from vlmerge.training.fisher import load_pretraining_objective
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, contrastive_logits
from vlmerge.training.setup import PairData, checkpoint_tokenizer

HELDOUT_BATCH = 32
OBJECTIVES = ("itc", "itc_vl", "itm", "mlm")
SAMPLES = (*OBJECTIVES, "loss", "i2t_correct", "itm_correct")


def evaluation_masks(
    text: TokenBatch, probability: float, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole words masked with `probability`, at least one per caption that has a word; every chosen
    token becomes [MASK] (no random or kept tokens: this scores, it does not regularise)."""
    words = text.word_ids
    slots = int(words.max().item()) + 2 if words.numel() else 2  # slot w + 1 for word w; slot 0 unused
    draws = torch.rand(words.shape[0], slots, generator=generator)
    present = torch.zeros_like(draws, dtype=torch.bool)
    present.scatter_(1, torch.where(words >= 0, words + 1, 0), True)
    present[:, 0] = False
    draws = draws.masked_fill(~present, 2.0)
    chosen_word = (draws < probability) & present
    rows = torch.arange(words.shape[0])
    first = draws.argmin(dim=1)
    chosen_word[rows, first] |= present[rows, first]
    chosen = torch.gather(chosen_word, 1, torch.where(words >= 0, words + 1, 0)) & (words >= 0)
    labels = torch.where(chosen, text.ids, torch.full_like(text.ids, IGNORE_INDEX))
    inputs = torch.where(chosen, torch.full_like(text.ids, mask_id), text.ids)
    return inputs, labels


def _pair_losses(logits: torch.Tensor) -> torch.Tensor:
    """(B,) per-pair symmetric InfoNCE of (B, B) similarities."""
    targets = torch.arange(logits.shape[0])
    return (
        F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")
    ) / 2


@torch.no_grad()
def batch_objectives(
    model: VLTransformer,
    heads: PretrainingHeads,
    batch: PairBatch,
    weights: ObjectiveWeights,
    mask_id: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Every sample of the module's docstring for one batch, as (B,) tensors."""
    ids, mask = batch.text.ids, batch.text.mask
    logits = contrastive_logits(
        heads.itc_image(model(images=batch.images).cls),
        heads.itc_text(model(text_ids=ids, text_mask=mask).cls),
        heads.logit_scale,
    )
    found = {"itc": _pair_losses(logits), "i2t_correct": (logits.argmax(dim=1) == torch.arange(len(batch))).double()}
    vl_logits = contrastive_logits(
        heads.itc_vl_image(model(images=batch.images, unimodal_through_vl=True).cls),
        heads.itc_vl_text(model(text_ids=ids, text_mask=mask, unimodal_through_vl=True).cls),
        heads.vl_logit_scale,
    )
    found["itc_vl"] = _pair_losses(vl_logits)
    following = torch.roll(torch.arange(len(batch)), -1)
    images = torch.cat([batch.images, batch.images, batch.images[following]])
    fused = model(
        images=images,
        text_ids=torch.cat([ids, ids[following], ids]),
        text_mask=torch.cat([mask, mask[following], mask]),
    )
    itm_logits = heads.itm(model.pool(fused)).view(3, len(batch), -1)
    labels = torch.tensor([1, 0, 0]).repeat_interleave(len(batch)).view(3, len(batch))
    itm = F.cross_entropy(itm_logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, len(batch))
    found["itm"] = itm.mean(dim=0)
    found["itm_correct"] = (itm_logits.argmax(dim=-1) == labels).double().mean(dim=0)
    inputs, targets = evaluation_masks(batch.text, weights.mask_probability, mask_id, generator)
    fused = model(images=batch.images, text_ids=inputs, text_mask=mask)
    predicted = heads.mlm(fused.hidden[:, : fused.num_text_tokens])
    token_loss = F.cross_entropy(
        predicted.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counted = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    found["mlm"] = token_loss.sum(dim=1) / counted
    found["loss"] = sum(getattr(weights, name) * found[name] for name in OBJECTIVES)
    return {name: found[name].double() for name in SAMPLES}


def heldout_batches(pairs: PairData, batch_size: int) -> Iterator[tuple[int, PairBatch]]:
    """Consecutive batches in the split's order, the last one shorter (at least two pairs: a pair needs
    another to be contrasted with, so a last batch of one joins the one before)."""
    starts = list(range(0, len(pairs), batch_size))
    if len(starts) > 1 and len(pairs) - starts[-1] < 2:
        starts.pop()
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(pairs)
        yield index, pairs[slice(start, end)]


def heldout_objectives(
    model: VLTransformer,
    heads: PretrainingHeads,
    pairs: PairData,
    weights: ObjectiveWeights,
    mask_id: int,
    batch_size: int = HELDOUT_BATCH,
    draw_seed: int = 0,
) -> Evaluation:
    """The held-out objectives of a model on `pairs`: means as metrics, one value per pair as samples."""
    if len(pairs) < 2:
        raise ValueError(f"held-out objectives need at least two pairs, got {len(pairs)}")
    was_training = model.training
    model.eval()
    heads.eval()
    collected: dict[str, list[np.ndarray]] = {name: [] for name in SAMPLES}
    try:
        with one_thread():
            for index, batch in heldout_batches(pairs, batch_size):
                generator = torch.Generator().manual_seed(draw_seed * 1_000_003 + index)
                for name, values in batch_objectives(model, heads, batch, weights, mask_id, generator).items():
                    collected[name].append(values.numpy())
    finally:
        model.train(was_training)
        heads.train(was_training)
    samples = {name: np.concatenate(parts) for name, parts in collected.items()}
    return Evaluation(
        {name: float(values.mean()) for name, values in samples.items()}, {n: v.tolist() for n, v in samples.items()}
    )


def checkpoint_heldout(
    checkpoint: str | os.PathLike,
    data: DataConfig,
    weights: ObjectiveWeights,
    split: str = "test",
    batch_size: int = HELDOUT_BATCH,
) -> Evaluation:
    """A checkpoint with its pre-training heads scored on the held-out objectives of `split`."""
    reader = open_checkpoint(checkpoint)
    objective = load_pretraining_objective(checkpoint, reader)
    tokenizer = checkpoint_tokenizer(reader, objective.model.config.max_text_len)
    pairs = PairData.of(load_pairs(data, split, progress=False), tokenizer)
    return heldout_objectives(objective.model, objective.heads, pairs, weights, tokenizer.mask_id, batch_size)
