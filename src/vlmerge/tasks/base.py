"""What a downstream task is: examples per split, a head, a loss, and metrics.

Examples are a dict of tensors with one row per example (model inputs under the names the
model takes, plus labels), so batching, sharding over ranks and moving to a device are one
line each and the same for every task. Image fields hold rows of the split's image store
until a batch is taken: a picture asked about many times is stored once, and a store may
read its files only when a batch needs them.

An evaluation returns, besides its metrics, the per-example values its primary metric is
computed from, and each task has a pure `primary_statistic` that recomputes that metric from
them, so the metric's test-set sampling error can be bootstrapped over examples.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
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
Samples = Mapping[str, Sequence[float] | np.ndarray]


@dataclass(frozen=True)
class Evaluation:
    """A split's scores: aggregate `metrics`, and `samples`, named per-example values in example
    order from which the task's `primary_statistic` recomputes `metrics[primary_metric]`."""

    metrics: dict[str, float]
    samples: dict[str, list[float] | list[list[float]]]  # a list per example, or rows of such lists

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "samples": {name: list(values) for name, values in self.samples.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Evaluation":
        """The inverse of `as_dict` (extra keys, such as those of results.json, are ignored)."""
        return cls(
            {name: float(value) for name, value in data["metrics"].items()},
            {name: _floats(values) for name, values in data["samples"].items()},
        )


def _floats(values: Sequence) -> list:
    """Numbers as floats, nested lists kept nested (per-example rows of several counts)."""
    return [_floats(value) if isinstance(value, list) else float(value) for value in values]


def sample_mean(values: Sequence[float] | np.ndarray, axis: int = -1) -> float | np.ndarray:
    """The mean over examples (along `axis`): a float for one array of values, an array of
    means for a stack of resamples."""
    return np.asarray(values, dtype=np.float64).mean(axis=axis)


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
    opt_in: ClassVar[bool] = False  # named only: left out of TASKS' listing, hence of default task lists

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

    def make_probe_head(self, config: ModelConfig) -> nn.Module:
        """The head a linear probe trains (`freeze_backbone`); the fine-tuning head unless a task has its own."""
        return self.make_head(config)

    def restore_head(self, config: ModelConfig, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The head `state` was saved from, loaded strictly: the fine-tuning head, else the probe head."""
        head = self.make_head(config)
        if set(state) != set(head.state_dict()):
            head = self.make_probe_head(config)
        head.load_state_dict(state, strict=True)
        return head

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
    ) -> Evaluation: ...

    @staticmethod
    @abstractmethod
    def primary_statistic(samples: Samples, axis: int = -1) -> float | np.ndarray:
        """`metrics[primary_metric]` recomputed from an evaluation's samples (equal up to float
        rounding). Pure: each sample array may be resampled first (bootstrap over examples).
        Vectorised: per-example values lie along `axis` (default last); arrays with leading
        axes (a stack of resamples, as scipy.stats.bootstrap passes with vectorized=True) give
        an array of statistics of that leading shape."""


class ClassifierTask(Task):
    """A task scored from per-example logits: cross-entropy to train, metrics over a split.
    Its samples are whether each prediction is right (1.0) or wrong (0.0); the primary metric,
    accuracy, is their mean."""

    @abstractmethod
    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, logits: torch.Tensor, split: str) -> dict[str, float]:
        """Scores of a whole split's logits (in example order) against its labels."""

    def samples(self, logits: torch.Tensor, split: str) -> dict[str, list[float]]:
        """The per-example values the primary metric is the mean of (in example order)."""
        return {"correct": correct(logits, self.examples(split)["labels"]).tolist()}

    @staticmethod
    def primary_statistic(samples: Samples, axis: int = -1) -> float | np.ndarray:
        return sample_mean(samples["correct"], axis)

    def loss(
        self, model: VLTransformer, head: nn.Module, batch: Examples, dist: DistributedContext = SINGLE_PROCESS
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy on this rank's rows (DDP's average makes it the global mean)."""
        return {"loss": nn.functional.cross_entropy(self.logits(model, head, batch), batch["labels"])}

    @torch.no_grad()
    def evaluate(self, model: VLTransformer, head: nn.Module, split: str = "test", batch_size: int = 128) -> Evaluation:
        device = next(model.parameters()).device
        with evaluation_mode(model, head):
            chunks = [
                self.logits(model, head, to_device(self.batch(split, slice(start, start + batch_size)), device))
                for start in range(0, self.num_examples(split), batch_size)
            ]
        logits = torch.cat([chunk.cpu() for chunk in chunks])
        return Evaluation(self.metrics(logits, split), self.samples(logits, split))


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


class TaskRegistry(Registry[type[Task]]):
    """Tasks by name. Listing it (iteration, `names`) gives the default tasks; an `opt_in` task is found
    by name (`get`, `in`) but listed only by `all_names`, so registering one changes no default task list."""

    def names(self) -> list[str]:
        return [name for name in self.all_names() if not self.get(name).opt_in]

    def all_names(self) -> list[str]:
        return super().names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


TASKS = TaskRegistry("task")


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) 1.0 where the top-scoring class is the label, else 0.0."""
    return (logits.argmax(dim=-1) == labels).float()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return correct(logits, labels).mean().item()


def mlp_head(width_in: int, classes: int) -> nn.Module:
    """The classifier on fused outputs used by VLMo/BEiT-3 style VQA and NLVR2 heads."""
    return nn.Sequential(
        nn.Linear(width_in, 2 * width_in), nn.GELU(), nn.LayerNorm(2 * width_in), nn.Linear(2 * width_in, classes)
    )
