"""What a downstream task is: examples per split, a head, a loss, and metrics.

Examples are a dict of tensors with one row per example (model inputs under the names the
model takes, plus labels), so batching, sharding over ranks and moving to a device are one
line each and the same for every task. Image fields hold rows of the split's image store
until a batch is taken: a picture asked about many times is stored once, and a store may
read its files only when a batch needs them.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from vlmerge.core.registry import Registry
from vlmerge.data.sources import DataSource, ImageStore
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.data.transforms import model_images
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext

Examples = dict[str, torch.Tensor]


def take(examples: Examples, rows: slice | torch.Tensor) -> Examples:
    return {name: tensor[rows] for name, tensor in examples.items()}


def to_device(examples: Examples, device: torch.device) -> Examples:
    return {name: tensor.to(device) for name, tensor in examples.items()}


def num_examples(examples: Examples) -> int:
    return len(next(iter(examples.values())))


def encode_text(tokenizer: TextTokenizer, texts: list[str], prefix: str = "text") -> Examples:
    tokens = tokenizer.encode(texts)
    return {f"{prefix}_ids": tokens.ids, f"{prefix}_mask": tokens.mask}


class Task(ABC):
    """A task over one data source; examples are built once per split."""

    name: ClassVar[str]  # its name in TASKS: register with @TASKS.register_class
    use: ClassVar[str]  # what it reads from its data source (see vlmerge.data.sources.USES)
    primary_metric: ClassVar[str]  # the metric a study scores the task by
    image_fields: ClassVar[tuple[str, ...]] = ("images",)  # example fields that are rows of the image store

    def __init__(self, source: DataSource, tokenizer: TextTokenizer, seed: int = 0) -> None:
        if self.use not in source.provides():
            raise source.unsupported(self.use)
        self.source = source
        self.tokenizer = tokenizer
        self.seed = seed
        self._splits: dict[str, tuple[ImageStore | None, Examples]] = {}

    def _built(self, split: str) -> tuple[ImageStore | None, Examples]:
        if split not in self._splits:
            self._splits[split] = self.build_examples(split)
        return self._splits[split]

    def examples(self, split: str) -> Examples:
        """The split's examples, image fields as rows of its image store."""
        return self._built(split)[1]

    def image_store(self, split: str) -> ImageStore | None:
        return self._built(split)[0]

    def batch(self, split: str, rows: slice | torch.Tensor) -> Examples:
        """Examples `rows` of a split with their images read, as the model takes them."""
        store, examples = self._built(split)
        batch = take(examples, rows)
        for field in self.image_fields:
            batch[field] = model_images(store[batch[field]])
        return batch

    def num_examples(self, split: str) -> int:
        return num_examples(self.examples(split))

    @abstractmethod
    def build_examples(self, split: str) -> tuple[ImageStore | None, Examples]: ...

    @abstractmethod
    def make_head(self, config: ModelConfig) -> nn.Module: ...

    def init_head(self, head: nn.Module, pretraining_heads: dict[str, torch.Tensor] | None) -> None:  # noqa: B027
        """Start from the pre-training heads where they fit the task (retrieval); else keep the random init."""

    @abstractmethod
    def loss(
        self, model: VLTransformer, head: nn.Module, batch: Examples, dist: DistributedContext = SINGLE_PROCESS
    ) -> dict[str, torch.Tensor]:
        """Losses on this rank's rows of a batch, the total under 'loss'."""

    @abstractmethod
    def evaluate(
        self, model: VLTransformer, head: nn.Module, split: str = "test", batch_size: int = 128
    ) -> dict[str, float]: ...


class ClassifierTask(Task):
    """A task scored from per-example logits: cross-entropy to train, metrics over a split."""

    @abstractmethod
    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, logits: torch.Tensor, split: str) -> dict[str, float]:
        """Scores of a whole split's logits (in example order) against its labels."""

    def loss(
        self, model: VLTransformer, head: nn.Module, batch: Examples, dist: DistributedContext = SINGLE_PROCESS
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy on this rank's rows (DDP's average makes it the global mean)."""
        return {"loss": nn.functional.cross_entropy(self.logits(model, head, batch), batch["labels"])}

    @torch.no_grad()
    def evaluate(
        self, model: VLTransformer, head: nn.Module, split: str = "test", batch_size: int = 128
    ) -> dict[str, float]:
        device = next(model.parameters()).device
        with evaluation_mode(model, head):
            chunks = [
                self.logits(model, head, to_device(self.batch(split, slice(start, start + batch_size)), device))
                for start in range(0, self.num_examples(split), batch_size)
            ]
        chunks = [chunk.cpu() for chunk in chunks]
        return self.metrics(torch.cat(chunks), split)


@contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Modules in eval mode inside, back to their previous mode after."""
    previous = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, previous):
            module.train(mode)


TASKS: Registry[type[Task]] = Registry("task")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def mlp_head(width_in: int, classes: int) -> nn.Module:
    """The classifier on fused outputs used by VLMo/BEiT-3 style VQA and NLVR2 heads."""
    return nn.Sequential(
        nn.Linear(width_in, 2 * width_in), nn.GELU(), nn.LayerNorm(2 * width_in), nn.Linear(2 * width_in, classes)
    )
