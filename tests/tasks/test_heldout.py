"""The held-out objectives, one value per pair: checked against the training objectives and against
cross-entropies computed by hand, and paired between models (same pairs, same draws)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmerge.data.masking import IGNORE_INDEX
from vlmerge.data.tokenizer import TokenBatch
from vlmerge.models import VLTransformer, model_config
from vlmerge.models.heads import PretrainingHeads
from vlmerge.tasks.heldout import SAMPLES, batch_objectives, evaluation_masks, heldout_batches, heldout_objectives
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, contrastive_logits, contrastive_loss

MASK_ID = 3


class Pairs:
    """Pairs held in memory, indexed by rows as the study's PairData is."""

    def __init__(self, config, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        size = config.image_size
        self.images = torch.randn(count, config.channels, size, size, generator=generator)
        length = 8
        ids = torch.randint(5, config.vocab_size, (count, length), generator=generator)
        lengths = torch.randint(3, length + 1, (count,), generator=generator)
        mask = torch.arange(length)[None] < lengths[:, None]
        words = torch.where(mask, torch.arange(length)[None].expand(count, -1) // 2, -1)  # two tokens a word
        self.text = TokenBatch(torch.where(mask, ids, 0), mask, words)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> PairBatch:
        return PairBatch(self.images[rows], self.text[rows])


@pytest.fixture(scope="module")
def setup():
    config = model_config("micro")
    torch.manual_seed(0)
    model, heads = VLTransformer(config).eval(), PretrainingHeads(config.width, config.vocab_size).eval()
    return config, model, heads


def test_the_masks_take_whole_words_and_at_least_one_per_caption():
    text = Pairs(model_config("micro"), 64).text
    inputs, labels = evaluation_masks(text, 0.1, MASK_ID, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    assert torch.all(chosen.sum(dim=1) >= 1)  # every caption has a word, so every caption is scored
    assert torch.equal(inputs[chosen], torch.full_like(inputs[chosen], MASK_ID))
    assert torch.equal(inputs[~chosen], text.ids[~chosen]) and torch.equal(labels[chosen], text.ids[chosen])
    for row in range(len(text)):  # a word is masked whole or not at all
        for word in text.word_ids[row].unique():
            if word >= 0:
                assert chosen[row][text.word_ids[row] == word].unique().numel() == 1
    assert not torch.any(chosen & (text.word_ids < 0))
    again = evaluation_masks(text, 0.1, MASK_ID, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs)


def test_each_objective_equals_its_definition(setup):
    config, model, heads = setup
    batch = Pairs(config, 6)[slice(0, 6)]
    weights = ObjectiveWeights()
    found = batch_objectives(model, heads, batch, weights, MASK_ID, torch.Generator().manual_seed(4))
    assert set(found) == set(SAMPLES) and all(v.shape == (6,) for v in found.values())
    with torch.no_grad():
        logits = contrastive_logits(
            heads.itc_image(model(images=batch.images).cls),
            heads.itc_text(model(text_ids=batch.text.ids, text_mask=batch.text.mask).cls),
            heads.logit_scale,
        )
        # The mean of the per-pair values is the training objective on the batch.
        assert found["itc"].mean().item() == pytest.approx(contrastive_loss(logits).item(), rel=1e-5)
        assert torch.equal(found["i2t_correct"], (logits.argmax(1) == torch.arange(6)).double())
        following = [1, 2, 3, 4, 5, 0]
        ids, mask = batch.text.ids, batch.text.mask
        for row in range(6):
            cases = [
                (batch.images[row], ids[row], mask[row], 1),
                (batch.images[row], ids[following[row]], mask[following[row]], 0),
                (batch.images[following[row]], ids[row], mask[row], 0),
            ]
            losses = [
                F.cross_entropy(
                    heads.itm(model.pool(model(images=i[None], text_ids=t[None], text_mask=m[None]))),
                    torch.tensor([label]),
                ).item()
                for i, t, m, label in cases
            ]
            assert found["itm"][row].item() == pytest.approx(np.mean(losses), rel=1e-4)
        inputs, labels = evaluation_masks(
            batch.text, weights.mask_probability, MASK_ID, torch.Generator().manual_seed(4)
        )
        fused = model(images=batch.images, text_ids=inputs, text_mask=mask)
        scores = heads.mlm(fused.hidden[:, : fused.num_text_tokens])
        for row in range(6):
            where = labels[row] != IGNORE_INDEX
            expected = F.cross_entropy(scores[row][where], labels[row][where]).item()
            assert found["mlm"][row].item() == pytest.approx(expected, rel=1e-4)
    total = sum(getattr(weights, name) * found[name] for name in ("itc", "itc_vl", "itm", "mlm"))
    assert torch.allclose(found["loss"], total)


def test_two_models_are_scored_on_the_same_pairs_with_the_same_draws(setup):
    config, model, heads = setup
    pairs = Pairs(config, 21)
    first = heldout_objectives(model, heads, pairs, ObjectiveWeights(), MASK_ID, batch_size=8)
    again = heldout_objectives(model, heads, pairs, ObjectiveWeights(), MASK_ID, batch_size=8)
    assert first == again
    assert all(len(values) == 21 for values in first.samples.values())
    assert first.metrics["loss"] == pytest.approx(np.mean(first.samples["loss"]))
    torch.manual_seed(1)
    other = VLTransformer(config).eval()
    second = heldout_objectives(other, heads, pairs, ObjectiveWeights(), MASK_ID, batch_size=8)
    assert second.samples["loss"] != first.samples["loss"]
    assert model.training is False


def test_a_last_batch_of_one_pair_joins_the_one_before():
    config = model_config("micro")
    sizes = [len(batch) for _, batch in heldout_batches(Pairs(config, 17), 8)]
    assert sizes == [8, 9]
    assert [len(b) for _, b in heldout_batches(Pairs(config, 18), 8)] == [8, 8, 2]
    with pytest.raises(ValueError, match="two pairs"):
        heldout_objectives(*[None] * 2, Pairs(config, 1), ObjectiveWeights(), MASK_ID)
