"""Tokenizer (trained WordPiece and BERT vocab.txt) and whole-word masking."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.masking import IGNORE_INDEX, whole_word_mask
from vlmerge.data.tokenizer import RESERVED_TOKENS, TextTokenizer

CAPTIONS = ["grinning face with big eyes", "slice of pizza", "red heart", "smiling face with sunglasses"] * 5
BERT_VOCAB = RESERVED_TOKENS + ["play", "##ing", "##ed", "cat", "dog", "the", "a", "un", "##happy"]


@pytest.fixture
def bert_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n")
    return path


def test_trained_tokenizer_pads_and_wraps_with_cls_sep(tmp_path):
    tokenizer = TextTokenizer.train(CAPTIONS, vocab_size=200, max_len=8)
    batch = tokenizer.encode(["Red heart", "grinning face with big eyes and more words"])
    assert batch.ids.shape == (2, 8)  # truncated to max_len
    assert batch.ids[0, 0] == tokenizer.token_id("[CLS]") and batch.ids[0, 3] == tokenizer.token_id("[SEP]")
    assert batch.mask[0].tolist() == [True] * 4 + [False] * 4
    assert batch.word_ids[0].tolist() == [-1, 0, 1, -1, -1, -1, -1, -1]
    reloaded = TextTokenizer.load(tokenizer.save(tmp_path / "tok.json"), max_len=8)
    assert torch.equal(reloaded.encode(["red heart"]).ids, tokenizer.encode(["red heart"]).ids)


# Merges worked by hand: ##u+##g (20), ##u+##n (16), h+##ug (15), p+##un (12), then p+##ug and
# hug+##s tie at 5 and the lower ids win (p=9, ##ug=16 before hug=18), then b+##un (4).
HUG_PUN = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
HUG_PUN_VOCAB = RESERVED_TOKENS + ["b", "g", "h", "n", "p", "s", "u", "##u", "##n", "##g", "##s"]
HUG_PUN_MERGES = ["##ug", "##un", "hug", "pun", "pug", "hugs", "bun"]


@pytest.mark.parametrize(
    "vocab_size, min_frequency, merges", [(21, 1, 5), (100, 5, 6), (100, 1, 7)], ids=["size", "frequency", "all"]
)
def test_trained_vocabulary_is_the_wordpiece_merges_worked_by_hand(vocab_size, min_frequency, merges):
    tokenizer = TextTokenizer.train(HUG_PUN, vocab_size=vocab_size, min_frequency=min_frequency)
    vocab = tokenizer.tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.get) == HUG_PUN_VOCAB + HUG_PUN_MERGES[:merges]


def test_training_writes_the_same_file_in_every_process(tmp_path):
    """HF's trainer numbered pieces in a per-process hash order and learned a different vocabulary
    in each process; the hash seed and thread count differ here, the bytes may not."""
    script = (
        "import json, sys; from vlmerge.data.tokenizer import TextTokenizer; "
        "TextTokenizer.train(json.loads(sys.argv[2]), vocab_size=200).save(sys.argv[1])"
    )
    captions = CAPTIONS + [f"{a} {b} with {c}" for a in ("red", "blue") for b in ("cat", "car") for c in ("tie", "hat")]
    files = []
    for hash_seed, threads in [("1", "1"), ("2", "2")]:
        path = tmp_path / f"tokenizer-{hash_seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "RAYON_NUM_THREADS": threads, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-c", script, str(path), json.dumps(captions)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_bert_vocab_splits_words_into_wordpieces(bert_vocab):
    tokenizer = TextTokenizer.from_vocab(bert_vocab)
    batch = tokenizer.encode(["The dog PLAYED unhappy"])
    tokens = [tokenizer.tokenizer.id_to_token(i) for i in batch.ids[0].tolist()]
    assert tokens == ["[CLS]", "the", "dog", "play", "##ed", "un", "##happy", "[SEP]"]
    assert batch.word_ids[0].tolist() == [-1, 0, 1, 2, 2, 3, 3, -1]


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such vocabulary"):
        TextTokenizer.from_vocab(tmp_path / "absent.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a tokenizer file"):
        TextTokenizer.load(tmp_path / "bad.json", max_len=8)


def test_whole_word_masking_masks_all_pieces_of_a_word_together(bert_vocab):
    tokenizer = TextTokenizer.from_vocab(bert_vocab)
    batch = tokenizer.encode(["the dog played unhappy a cat"] * 200)
    inputs, labels = whole_word_mask(
        batch, 0.3, tokenizer.mask_id, tokenizer.vocab_size, torch.Generator().manual_seed(0)
    )
    chosen = labels != IGNORE_INDEX
    for row in range(len(labels)):  # every piece of a word shares the word's fate
        for word in batch.word_ids[row].unique().tolist():
            if word >= 0:
                assert chosen[row][batch.word_ids[row] == word].unique().numel() == 1
    assert not chosen[batch.word_ids < 0].any()  # never [CLS], [SEP] or padding
    assert torch.equal(labels[chosen], batch.ids[chosen])
    word_rate = chosen[:, 1].float().mean().item()  # token 1 is the word "the"
    assert word_rate == pytest.approx(0.3, abs=0.08)
    masked = (inputs == tokenizer.mask_id) & chosen
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.06)
    assert torch.equal(inputs[~chosen], batch.ids[~chosen])


@pytest.mark.parametrize("probability, expected", [(0.0, 0), (1.0, 6)])
def test_masking_probability_extremes(bert_vocab, probability, expected):
    tokenizer = TextTokenizer.from_vocab(bert_vocab)
    batch = tokenizer.encode(["the dog played unhappy"])
    _, labels = whole_word_mask(batch, probability, tokenizer.mask_id, tokenizer.vocab_size)
    assert int((labels != IGNORE_INDEX).sum()) == expected
