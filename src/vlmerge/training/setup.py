"""What every stage builds the same way: data, tokenizer, optimiser and schedule."""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import CaptionPairs
from vlmerge.data.tokenizer import TextTokenizer, TokenBatch
from vlmerge.data.transforms import model_images
from vlmerge.io.checkpoint import CheckpointReader, open_checkpoint
from vlmerge.training.config import OptimizerConfig, TokenizerConfig, read_yaml
from vlmerge.training.objectives import PairBatch

EMBEDDING_NAMES = ("cls_token", "pos_embed", "text_embed", "token_type_embed")  # tables, not maps: no decay


def checkpoint_data(reader: CheckpointReader, **fields) -> DataConfig:
    """Data at the image size the checkpoint's model takes, unless `fields` say otherwise."""
    image_size = (reader.config or {}).get("image_size", DataConfig().image_size)
    return DataConfig.parse({"image_size": image_size, **fields}, where="data config")


def resolve_data(data: str | os.PathLike | None, checkpoint: str | os.PathLike, limit: int | None = None) -> DataConfig:
    """`data`: a dataset name (default emoji), or a YAML data config for datasets read from local
    paths; at the image size of the checkpoint's model unless the YAML says otherwise."""
    data = str(data) if data is not None else None
    fields = read_yaml(data) if data and data.endswith((".yaml", ".yml")) else {"dataset": data or "emoji"}
    if limit is not None:
        fields["limit"] = limit
    return checkpoint_data(open_checkpoint(checkpoint), **fields)


@dataclass(frozen=True, eq=False)
class PairData:
    """Captions tokenised once; indexing rows (captions) gives a PairBatch with their images read."""

    pairs: CaptionPairs
    tokens: TokenBatch

    @classmethod
    def of(cls, pairs: CaptionPairs, tokenizer: TextTokenizer) -> "PairData":
        return cls(pairs, tokenizer.encode(list(pairs.captions)))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, rows: slice | torch.Tensor) -> PairBatch:
        return PairBatch(model_images(self.pairs.images[self.pairs.image_of[rows]]), self.tokens[rows])


def resolve_tokenizer(config: TokenizerConfig, captions: Sequence[str], init: CheckpointReader | None) -> TextTokenizer:
    """The checkpoint's tokenizer when starting from one; else a saved one, a BERT vocab.txt,
    or a WordPiece vocabulary trained on the training captions."""
    if init is not None and "tokenizer" in init.metadata:
        if config.path or config.vocab_file:
            raise ConfigError(f"{init.path} brings its own tokenizer; drop tokenizer.path / tokenizer.vocab_file")
        return TextTokenizer.from_json(init.metadata["tokenizer"], config.max_len)
    if config.path:
        return TextTokenizer.load(config.path, config.max_len)
    if config.vocab_file:
        return TextTokenizer.from_vocab(config.vocab_file, config.max_len)
    return TextTokenizer.train(list(captions), vocab_size=config.vocab_size, max_len=config.max_len)


def checkpoint_tokenizer(reader: CheckpointReader, max_len: int) -> TextTokenizer:
    if "tokenizer" not in reader.metadata:
        raise CheckpointError(
            f"{reader.path}: carries no tokenizer; train it with `vlmerge train` or merge a checkpoint that has one"
        )
    return TextTokenizer.from_json(reader.metadata["tokenizer"], max_len)


def parameter_groups(modules: list[nn.Module], weight_decay: float, lr: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, layer scales, temperatures, embeddings."""
    decay, no_decay = [], []
    for module in modules:
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            plain = parameter.ndim < 2 or any(part in name for part in EMBEDDING_NAMES)
            (no_decay if plain else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [group for group in groups if group["params"]]


def make_optimizer(
    modules: list[nn.Module], config: OptimizerConfig, steps: int, head: nn.Module | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (or SGD) with linear warm-up, then cosine decay to 10 % of the peak rate. A task
    head, new and randomly initialised, learns `head_lr_multiplier` times faster.

    The update runs as foreach kernels, one call per operation for all parameters: on the CPU torch
    would otherwise loop over them in Python, the largest cost of a micro step after the model's.
    Foreach gives the per-parameter loop's bytes; the fused kernel does not, so it is not used."""
    groups = parameter_groups(modules, config.weight_decay, config.lr)
    if head is not None:
        groups += parameter_groups([head], config.weight_decay, config.lr * config.head_lr_multiplier)
    if config.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, foreach=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, foreach=True)
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
