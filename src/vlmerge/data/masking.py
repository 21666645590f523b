"""Whole-word masking for masked language modelling (BERT's 80/10/10 replacement)."""

import torch

from vlmerge.data.tokenizer import TokenBatch

IGNORE_INDEX = -100


def whole_word_mask(
    batch: TokenBatch, probability: float, mask_id: int, vocab_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask every sub-token of a chosen word together; return (input ids, labels).

    Each word is chosen with `probability`; its tokens become [MASK] 80 % of the time, a
    random token 10 %, unchanged 10 %. Labels are the original ids there and -100 elsewhere.
    """
    words = batch.word_ids
    chosen_word = (
        torch.rand(words.shape[0], int(words.max().item()) + 2, generator=generator, device=words.device) < probability
    )
    chosen = torch.gather(chosen_word, 1, words.clamp(min=0) + 1) & (words >= 0)  # (B, T)
    labels = torch.where(chosen, batch.ids, torch.full_like(batch.ids, IGNORE_INDEX))
    draw = torch.rand(batch.ids.shape, generator=generator, device=words.device)
    random_ids = torch.randint(0, vocab_size, batch.ids.shape, generator=generator, device=words.device)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(batch.ids, mask_id), batch.ids)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, inputs)
    return inputs, labels
