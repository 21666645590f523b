"""Text tokenisation with HF `tokenizers`: a small WordPiece vocabulary trained on captions,
or a standard BERT `vocab.txt`, both with BERT conventions ([CLS] text [SEP], lower case)."""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlmerge.core.errors import ConfigError
from vlmerge.io.atomic import atomic_path

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]


@dataclass
class TokenBatch:
    ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T) bool, True for real tokens
    word_ids: torch.Tensor  # (B, T) long: index of the word each token belongs to, -1 for special/padding

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> "TokenBatch":
        return TokenBatch(self.ids[rows], self.mask[rows], self.word_ids[rows])

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.word_ids.to(device))


class TextTokenizer:
    """Encodes batches of captions into padded id tensors for the model."""

    def __init__(self, tokenizer: Tokenizer, max_len: int) -> None:
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"tokenizer vocabulary lacks the special tokens {missing}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tokenizer.enable_truncation(max_len)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1000, max_len: int = 24, min_frequency: int = 1
    ) -> "TextTokenizer":
        tokenizer = _bert_pipeline(models.WordPiece(unk_token=UNK))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(_with_template(tokenizer), max_len)

    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, max_len: int = 40) -> "TextTokenizer":
        """A standard BERT uncased `vocab.txt`, one token per line."""
        if not Path(vocab_file).is_file():
            raise ConfigError(f"{vocab_file}: no such vocabulary file")
        tokenizer = _bert_pipeline(models.WordPiece.from_file(str(vocab_file), unk_token=UNK))
        return cls(_with_template(tokenizer), max_len)

    @classmethod
    def load(cls, path: str | os.PathLike, max_len: int) -> "TextTokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)), max_len)
        except Exception as error:  # tokenizers raises its own exception type
            raise ConfigError(f"{path}: not a tokenizer file ({error})") from error

    @classmethod
    def from_json(cls, text: str, max_len: int) -> "TextTokenizer":
        """The tokenizer a checkpoint carries in its metadata."""
        try:
            return cls(Tokenizer.from_str(text), max_len)
        except Exception as error:  # tokenizers raises its own exception type
            raise ConfigError(f"not a serialised tokenizer ({error})") from error

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))
        return Path(path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    @property
    def mask_id(self) -> int:
        return self.token_id(MASK)

    def encode(self, texts: Sequence[str]) -> TokenBatch:
        encodings = self.tokenizer.encode_batch(list(texts))
        length = max(len(e.ids) for e in encodings)
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        word_ids = torch.full((len(texts), length), -1, dtype=torch.long)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
            words = [
                -1 if w is None or special else w for w, special in zip(encoding.word_ids, encoding.special_tokens_mask)
            ]
            word_ids[row, : len(words)] = torch.tensor(words)
        return TokenBatch(ids, ids != self.pad_id, word_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def _bert_pipeline(model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _with_template(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, tokenizer.token_to_id(CLS)), (SEP, tokenizer.token_to_id(SEP))]
    )
    return tokenizer
