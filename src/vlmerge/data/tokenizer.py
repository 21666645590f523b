"""Text tokenisation with HF `tokenizers`: a small WordPiece vocabulary trained on captions,
or a standard BERT `vocab.txt`, both with BERT conventions ([CLS] text [SEP], lower case).

The trained vocabulary is the same, byte for byte, in every process: HF's `WordPieceTrainer`
gives its `##` pieces ids in the iteration order of a randomly seeded hash map, and those ids
break ties between merges, so it learns a different vocabulary in each process (huggingface/
tokenizers#1794). `_learn_wordpiece` runs the same algorithm with that order fixed."""

import heapq
import itertools
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from vlmerge.core.errors import ConfigError
from vlmerge.io.atomic import atomic_path

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
RESERVED_TOKENS = [PAD, UNK, CLS, SEP, MASK]
PIECE_PREFIX = "##"  # marks a WordPiece that continues a word


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
        missing = [t for t in RESERVED_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"tokenizer vocabulary lacks the special tokens {missing}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tokenizer.enable_truncation(max_len)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1000, max_len: int = 24, min_frequency: int = 1
    ) -> "TextTokenizer":
        """A WordPiece vocabulary learned from `texts`; the same texts give the same bytes in
        every process, whatever the hash seed or thread count."""
        words = _bert_pipeline(models.WordPiece(unk_token=UNK))
        counts = Counter(
            word
            for text in texts
            for word, _ in words.pre_tokenizer.pre_tokenize_str(words.normalizer.normalize_str(text))
        )
        vocab = _learn_wordpiece(counts, vocab_size, min_frequency, RESERVED_TOKENS)
        tokenizer = _bert_pipeline(models.WordPiece(vocab, unk_token=UNK))
        tokenizer.add_special_tokens(RESERVED_TOKENS)  # as `train_from_iterator` does
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
        pad_id = self.pad_id
        ids, word_ids = [], []
        for encoding in encodings:  # padded as lists, then one tensor each: a tensor per row costs more
            padding = length - len(encoding.ids)
            ids.append(encoding.ids + [pad_id] * padding)
            words = [
                -1 if w is None or special else w for w, special in zip(encoding.word_ids, encoding.special_tokens_mask)
            ]
            word_ids.append(words + [-1] * padding)
        ids = torch.tensor(ids, dtype=torch.long)
        return TokenBatch(ids, ids != pad_id, torch.tensor(word_ids, dtype=torch.long))

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


def _learn_wordpiece(
    word_counts: Mapping[str, int], vocab_size: int, min_frequency: int, special_tokens: Sequence[str]
) -> dict[str, int]:
    """HF's WordPiece training (`BpeTrainer` with a `##` prefix, tokenizers 0.23) step for step:
    ids go to the special tokens, the alphabet in code-point order, the `##` pieces, then each
    merge of the most frequent adjacent pair, ties going to the lower pair of ids, until the
    vocabulary holds `vocab_size` tokens. HF numbers the `##` pieces in hash-map order; here they
    are numbered as they first occur in the words sorted, which is upstream's fix (PR #2066)."""
    tokens = list(dict.fromkeys(special_tokens))
    ids = {token: i for i, token in enumerate(tokens)}

    def token_id(token: str) -> int:
        if token not in ids:
            ids[token] = len(tokens)
            tokens.append(token)
        return ids[token]

    for char in sorted({char for word in word_counts for char in word}):
        token_id(char)
    words = sorted(word_counts)
    counts = [word_counts[word] for word in words]
    symbols = [[token_id(word[0]), *(token_id(PIECE_PREFIX + char) for char in word[1:])] for word in words]

    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, word in enumerate(symbols):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    queue: list[tuple[int, tuple[int, int], int, set[int]]] = []  # (-count, pair, push order, words to merge in)
    order = itertools.count()

    def push(where: Mapping[tuple[int, int], set[int]]) -> None:
        for pair, positions in where.items():
            if pair_counts[pair] > 0:
                heapq.heappush(queue, (-pair_counts[pair], pair, next(order), positions))

    push(where)
    while len(tokens) < vocab_size and queue:
        stale, pair, _, positions = heapq.heappop(queue)
        if -stale != pair_counts[pair]:  # the count changed since this entry was pushed
            heapq.heappush(queue, (-pair_counts[pair], pair, next(order), positions))
            continue
        if pair_counts[pair] < max(1, min_frequency):
            break
        merged = token_id(tokens[pair[0]] + tokens[pair[1]].removeprefix(PIECE_PREFIX))
        gained: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for i in positions:
            for changed, change in _merge_pair(symbols[i], pair, merged):
                pair_counts[changed] += change * counts[i]
                if change > 0:
                    gained[changed].add(i)
        push(gained)
    return ids


def _merge_pair(word: list[int], pair: tuple[int, int], merged: int) -> list[tuple[tuple[int, int], int]]:
    """Replace each occurrence of `pair` in `word` (in place) by `merged`; the pairs lost (-1) and formed (+1)."""
    changes = []
    i = 0
    while i < len(word) - 1:
        if (word[i], word[i + 1]) == pair:
            if i > 0:
                changes += [((word[i - 1], pair[0]), -1), ((word[i - 1], merged), 1)]
            word[i : i + 2] = [merged]
            if i < len(word) - 1:
                changes += [((pair[1], word[i + 1]), -1), ((merged, word[i + 1]), 1)]
        i += 1
    return changes
