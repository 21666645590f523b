"""What every stage builds the same way: data, tokenizer, optimiser and schedule."""

import functools
import math

import torch
from torch import nn

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.data.emoji import EmojiDataset, build_emoji_dataset
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.data.transforms import model_images
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.training.config import DataConfig, OptimizerConfig, TokenizerConfig
from vlmerge.training.objectives import PairBatch

EMBEDDING_NAMES = ("cls_token", "pos_embed", "text_embed", "token_type_embed")  # tables, not maps: no decay


@functools.lru_cache(maxsize=4)
def load_dataset(config: DataConfig, progress: bool = False) -> EmojiDataset:
    """The dataset, kept in memory across the stages of one process (a study runs many)."""
    return build_emoji_dataset(config.image_size, config.cache_dir, limit=config.limit, progress=progress)


def checkpoint_data(reader: CheckpointReader, **fields) -> DataConfig:
    """Data at the image size the checkpoint's model takes (other fields as given)."""
    image_size = (reader.config or {}).get("image_size", DataConfig().image_size)
    return DataConfig(image_size=image_size, **fields)


def pair_batch(dataset: EmojiDataset, tokenizer: TextTokenizer) -> PairBatch:
    """The whole split as one batch of (image, name) pairs: steps index rows of it."""
    captions = [dataset.caption(i) for i in range(len(dataset))]
    return PairBatch(model_images(dataset.images), tokenizer.encode(captions))


def resolve_tokenizer(config: TokenizerConfig, train: EmojiDataset, init: CheckpointReader | None) -> TextTokenizer:
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
    captions = [train.caption(i) for i in range(len(train))]
    return TextTokenizer.train(captions, vocab_size=config.vocab_size, max_len=config.max_len)


def checkpoint_tokenizer(reader: CheckpointReader, max_len: int) -> TextTokenizer:
    if "tokenizer" not in reader.metadata:
        raise CheckpointError(f"{reader.path}: carries no tokenizer; train it with `vlmerge train` or merge a "
                              "checkpoint that has one")
    return TextTokenizer.from_json(reader.metadata["tokenizer"], max_len)


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, layer scales, temperatures, embeddings."""
    decay, no_decay = [], []
    for module in modules:
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            plain = parameter.ndim < 2 or any(part in name for part in EMBEDDING_NAMES)
            (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(modules: list[nn.Module], config: OptimizerConfig, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (or SGD) with linear warm-up, then cosine decay to 10 % of the peak rate."""
    groups = parameter_groups(modules, config.weight_decay)
    if config.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
