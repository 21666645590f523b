"""What crosses a stage boundary, typed: each stage kind's settings and the output it records.

A stage's settings are a frozen pydantic model; their canonical JSON (`model_dump(mode="json")`,
keys sorted) is what the stage's cache key hashes and what its done.json records. A stage's output is
a frozen pydantic model too: the work writes it, the cache writes it as the stage's result and reads it
back by type, and the assembler reads its attributes. Settings that already exist as run configs
(pre-training, fine-tuning) are those configs, with the fields the inputs fill in left out of the hash.
"""

from pathlib import Path
from typing import Self, TypeVar

from pydantic import ConfigDict, Field, JsonValue, model_serializer

from vlmerge.core.config import StrictConfig
from vlmerge.data.config import DataConfig
from vlmerge.merging.regmean_pp import SequentialOptions
from vlmerge.study.results import GalleryEntry
from vlmerge.tasks.base import Evaluation
from vlmerge.training.config import FinetuneConfig, PretrainConfig, TokenizerConfig
from vlmerge.training.objectives import ObjectiveWeights
from vlmerge.tuning.adamerge import AdaMergeConfig

M = TypeVar("M", bound=StrictConfig)

# ---- settings ---------------------------------------------------------------------------------------


class TokenizerSettings(StrictConfig):
    """The study's shared vocabulary, trained on the pre-training captions."""

    data: DataConfig
    tokenizer: TokenizerConfig


class PretrainedSettings(StrictConfig):
    """The imported ViT-S/14 with MiniLM's text embeddings; its few random parts drawn with the seed."""

    image_size: int
    max_text_len: int
    random_seed: int


class UntrainedSettings(PretrainConfig):
    """The seed run's model at step 0: a pre-training config whose step count the model does not
    depend on, so it is left out of the hash."""

    steps: int = Field(1, ge=1, exclude=True)

    def config(self, tokenizer: Path) -> PretrainConfig:
        return with_fields(
            PretrainConfig, self, tokenizer=with_fields(TokenizerConfig, self.tokenizer, path=str(tokenizer))
        )


class GramsSettings(StrictConfig):
    """Gram matrices of a model's experts; with `sequential`, RegMean++'s pass (the lower layers merged
    as it goes), which only then appears in the hash, so ordinary Gram stages keep their names."""

    split: str
    batch_size: int
    data: DataConfig
    sequential: SequentialOptions | None = None

    @model_serializer(mode="wrap")
    def _without_absent_sequential(self, handler):
        dumped = handler(self)
        if self.sequential is None:
            dumped.pop("sequential", None)
        return dumped


class FisherSettings(StrictConfig):
    split: str
    batch_size: int
    random_seed: int  # draws the MLM masks and ITM negatives
    data: DataConfig


class MergeSettings(StrictConfig):
    """A merge by the engine; with `adamerge`, arithmetic's lam learnt on `data`'s validation pairs first.
    Those two enter the hash only when set, so a merge without them keeps its name."""

    method: str
    options: dict[str, JsonValue] = {}  # as the recipe gives them; the engine resolves coefficient specs
    adamerge: AdaMergeConfig | None = None
    data: DataConfig | None = None

    @model_serializer(mode="wrap")
    def _without_absent_learning(self, handler):
        dumped = handler(self)
        for name in ("adamerge", "data"):
            if getattr(self, name) is None:
                dumped.pop(name, None)
        return dumped


class FinetuneSettings(FinetuneConfig):
    """A fine-tuning (or probe) run; the checkpoint it starts from is its input, not its setting."""

    init: str = Field("", exclude=True)

    def config(self, checkpoint: Path) -> FinetuneConfig:
        return with_fields(FinetuneConfig, self, init=str(checkpoint))


class ZeroShotSettings(StrictConfig):
    data: DataConfig


class HeldoutSettings(StrictConfig):
    """The pre-training objectives on a held-out split (`tasks.heldout`): the recipe's objective weights,
    the same for every model, so that the models' values pair up pair by pair."""

    data: DataConfig
    split: str
    batch_size: int
    objectives: ObjectiveWeights


class PathSettings(HeldoutSettings):
    """The held-out objectives of the interpolation merge of a specific model's experts at each ratio."""

    ratios: tuple[float, ...]


class MergeabilitySettings(StrictConfig):
    """Distances between a specific model's experts depend on nothing but that model."""


class GallerySettings(StrictConfig):
    data: DataConfig
    size: int


def with_fields(kind: type[M], config: StrictConfig, **changes: object) -> M:
    """`config`'s fields as a `kind`, some changed, validated again (model_copy would skip the validators).
    A field left out of `config`'s hash is not carried over: `kind` takes its default or `changes`' value."""
    fields = {
        name: getattr(config, name)
        for name in kind.model_fields
        if name in type(config).model_fields and not type(config).model_fields[name].exclude
    }
    return kind.model_validate({**fields, **changes})


# ---- outputs ----------------------------------------------------------------------------------------


class Written(StrictConfig):
    """A stage whose output is its file alone (a tokenizer, Gram matrices, Fisher statistics)."""


class CheckpointOutput(StrictConfig):
    parameters: int  # of the backbone (heads apart), as `count_parameters` counts them


class MergeOutput(CheckpointOutput):
    warnings: tuple[str, ...] = ()


class EvaluationOutput(StrictConfig):
    """A split's scores (`tasks.base.Evaluation`): aggregate metrics and the per-example samples."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a NaN metric stays NaN, as json.dumps wrote it

    metrics: dict[str, float]
    samples: dict[str, list[float] | list[list[float]]]  # per example, or rows of per-example counts

    @classmethod
    def of(cls, evaluation: Evaluation) -> Self:
        return cls(metrics=evaluation.metrics, samples=evaluation.samples)


class PathOutput(StrictConfig):
    """Per ratio (as text, e.g. '0.25'), the held-out objectives of the merge at that ratio."""

    points: dict[str, EvaluationOutput]


class DistancesOutput(StrictConfig):
    """Distances between a specific model's experts: over the whole model, and per layer."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    model: dict[str, float]
    layers: dict[int, dict[str, float]]


class GalleryOutput(StrictConfig):
    entries: tuple[GalleryEntry, ...]  # images relative to the stage's directory
