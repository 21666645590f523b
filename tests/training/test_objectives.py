"""Pre-training objectives: values against independent computations, gradients, falling losses."""

import numpy as np
import pytest
import torch

from vlmerge.data.tokenizer import RESERVED_TOKENS, TextTokenizer
from vlmerge.models import VLTransformer
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.objectives import (
    ObjectiveWeights,
    PairBatch,
    contrastive_logits,
    contrastive_loss,
    pretraining_losses,
    sample_hard_negatives,
)

CAPTIONS = ["grinning face", "red heart", "slice of pizza", "smiling cat", "blue car", "green tree"]


@pytest.fixture
def setup(micro_config, tmp_path):
    torch.manual_seed(0)
    # A fixed vocabulary: WordPiece *training* is not deterministic across processes.
    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(RESERVED_TOKENS + words) + "\n")
    tokenizer = TextTokenizer.from_vocab(tmp_path / "vocab.txt", max_len=micro_config.max_text_len)
    config = micro_config.model_copy(update={"vocab_size": tokenizer.vocab_size})
    model, heads = VLTransformer(config), PretrainingHeads(config.width, tokenizer.vocab_size)
    images = torch.rand(
        len(CAPTIONS), 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1)
    )
    return model, heads, PairBatch(images, tokenizer.encode(CAPTIONS)), tokenizer


def test_contrastive_loss_matches_an_independent_computation():
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    logits = contrastive_logits(image, text, torch.tensor(np.log(1 / 0.07)))
    a = image.numpy() / np.linalg.norm(image.numpy(), axis=1, keepdims=True)
    b = text.numpy() / np.linalg.norm(text.numpy(), axis=1, keepdims=True)
    sims = a @ b.T / 0.07

    def nll(m):
        return -np.mean(np.diag(m) - np.log(np.exp(m).sum(axis=1)))

    np.testing.assert_allclose(logits.numpy(), sims, rtol=1e-4)
    assert contrastive_loss(logits).item() == pytest.approx((nll(sims) + nll(sims.T)) / 2, rel=1e-4)


def test_hard_negatives_are_never_the_positive_and_favour_similar_items():
    logits = torch.randn(6, 6)
    logits[0, 3] = 50.0  # text 3 is by far the hardest negative for image 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        text_for_image, image_for_text = sample_hard_negatives(logits, generator)
        assert not (text_for_image == torch.arange(6)).any() and not (image_for_text == torch.arange(6)).any()
        assert text_for_image[0] == 3


def test_every_parameter_of_model_and_heads_gets_a_gradient(setup):
    model, heads, batch, tokenizer = setup
    losses = pretraining_losses(
        model, heads, batch, ObjectiveWeights(mask_probability=0.5), tokenizer.mask_id, torch.Generator().manual_seed(0)
    )
    assert set(losses) == {"itc", "itc_vl", "itm", "mlm", "loss"}
    losses["loss"].backward()
    params = list(model.named_parameters()) + [(f"heads.{n}", p) for n, p in heads.named_parameters()]
    assert [n for n, p in params if p.grad is None or p.grad.abs().sum() == 0] == []


@pytest.mark.parametrize("agnostic", [False, True], ids=["modality-specific", "modality-agnostic"])
def test_losses_fall_when_overfitting_one_batch(setup, agnostic):
    """Contrastive and MLM losses fall sharply within 100 steps. ITM (matching noise images to
    captions through two fusion layers) learns far more slowly at this size; here it must only
    stay near its class prior, not diverge."""
    model, heads, batch, tokenizer = setup
    if agnostic:
        model = VLTransformer(model.config.agnostic())
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-3)
    weights = ObjectiveWeights(mask_probability=0.5)
    history = []
    for step in range(100):
        losses = pretraining_losses(
            model, heads, batch, weights, tokenizer.mask_id, torch.Generator().manual_seed(step % 2)
        )
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    for name in ("itc", "itc_vl", "mlm"):
        first, last = np.mean([h[name] for h in history[:4]]), np.mean([h[name] for h in history[-4:]])
        assert last < 0.7 * first, f"{name}: {first:.3f} -> {last:.3f}"
    assert np.mean([h["itm"] for h in history[-4:]]) < 0.7  # the 1:2 prior's entropy is 0.64
