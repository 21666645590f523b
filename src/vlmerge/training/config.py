"""Stage configs (YAML -> validated, frozen objects): seed, specific and finetune runs.

The run directory a stage runs in (its lock, manifest and resume checks) is `training.run_directory`.
"""

import os
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import Field, model_validator

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.models.config import ExpertPlacement
from vlmerge.training.objectives import ObjectiveWeights

Stage = Literal["seed", "specific", "finetune"]
STAGES: tuple[str, ...] = ("seed", "specific", "finetune")


class OptimizerConfig(StrictConfig):
    name: Literal["adamw", "sgd"] = Field("adamw", description="sgd (momentum 0.9): updates linear in the gradients")
    lr: FiniteFloat = Field(1e-3, gt=0)
    weight_decay: FiniteFloat = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=2, description="global batch, split evenly over processes")
    grad_clip: FiniteFloat | None = Field(1.0, gt=0)
    head_lr_multiplier: FiniteFloat = Field(
        1.0, gt=0, description="fine-tuning: the new task head's rate over the model's"
    )


class ModelSpec(StrictConfig):
    size: str = "micro"
    placement: ExpertPlacement | None = Field(
        None, description="where the experts sit; default: none for seed, all for specific"
    )
    fusion_layer: int | None = None
    layer_scale_init: FiniteFloat | None = Field(None, gt=0)

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "size" and v is not None}


class TokenizerConfig(StrictConfig):
    """Where the vocabulary comes from: a saved tokenizer, a BERT vocab.txt, or trained on the
    training captions. A run that starts from a checkpoint uses the checkpoint's tokenizer."""

    path: str | None = None
    vocab_file: str | None = None
    vocab_size: int = Field(1000, ge=16)
    max_len: int = Field(24, ge=4)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.path and self.vocab_file:
            raise ValueError("give tokenizer.path or tokenizer.vocab_file, not both")
        return self


class RunConfig(StrictConfig):
    random_seed: int = Field(0, description="seeds initialisation, batch order and masking")
    steps: int = Field(100, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()


class PretrainConfig(RunConfig):
    """Seed pre-training (modality-agnostic) or modality-specific pre-training."""

    stage: Literal["seed", "specific"]
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerConfig = TokenizerConfig()
    objectives: ObjectiveWeights = ObjectiveWeights()
    init: str | None = Field(
        None,
        description="a modality-agnostic checkpoint to start from (seed: e.g. a pretrained "
        "ViT; specific: the seed); none = random (naive merging for specific)",
    )

    @model_validator(mode="after")
    def _stage_rules(self) -> Self:
        if self.stage == "seed" and self.model.placement not in (None, ExpertPlacement.NONE):
            raise ValueError("seed pre-training trains the modality-agnostic model: drop model.placement")
        if self.stage == "specific" and self.model.placement is ExpertPlacement.NONE:
            raise ValueError("modality-specific pre-training needs experts: model.placement cannot be 'none'")
        return self

    @property
    def placement(self) -> ExpertPlacement:
        return self.model.placement or (ExpertPlacement.NONE if self.stage == "seed" else ExpertPlacement.ALL)


class FinetuneConfig(RunConfig):
    stage: Literal["finetune"] = "finetune"
    task: str
    init: str = Field(description="checkpoint to fine-tune: pre-trained, modality-specific or merged")
    eval_split: Literal["val", "test"] = "test"
    eval_batch_size: int = Field(128, ge=1)
    freeze_backbone: bool = Field(
        False, description="linear probe: train the task head only, the pre-trained model frozen"
    )


StageConfig = PretrainConfig | FinetuneConfig


def parse_stage_config(stage: str, data: dict[str, Any], where: str = "config") -> StageConfig:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if data.get("stage", stage) != stage:
        raise ConfigError(f"{where}: says stage {data['stage']!r} but is run as {stage!r}")
    cls = FinetuneConfig if stage == "finetune" else PretrainConfig
    return cls.parse({**data, "stage": stage}, where=where)


def load_stage_config(stage: str, path: str | os.PathLike) -> StageConfig:
    return parse_stage_config(stage, read_yaml(path), where=str(path))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data
