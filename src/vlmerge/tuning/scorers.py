"""What `vlmerge tune` scores each candidate by, on the validation split only: zero-shot retrieval
(its primary metric), or a linear probe (the task head trained on the training split by the
fine-tuning code, the merged model frozen). The test split is never read."""

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import check_data, load_source
from vlmerge.io.atomic import scratch_folder
from vlmerge.io.checkpoint import CARRIED_METADATA, CheckpointReader, save_checkpoint
from vlmerge.models.checkpoint import head_names
from vlmerge.models.config import ModelConfig
from vlmerge.models.families import checkpoint_config
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks import TASKS, Task
from vlmerge.tasks.base import Evaluation
from vlmerge.tasks.finetune import TASK_HEAD, run_finetune
from vlmerge.training.config import FinetuneConfig
from vlmerge.training.pretrain import HEADS
from vlmerge.training.setup import checkpoint_tokenizer

SPLIT = "val"  # every candidate is scored here, and the test split is never read
TRAIN_SPLIT = "train"  # the probe's head trains here


class TuneObjective(StrictConfig):
    """What each candidate is scored by, on the validation split: zero-shot retrieval, or a linear
    probe of `task` (`probe_steps` of the fine-tuning code with the backbone frozen). Every candidate's
    probe starts from the same seeded head and sees the same batches."""

    kind: Literal["retrieval", "probe"] = "retrieval"
    task: str = "retrieval"
    probe_steps: int = Field(50, ge=1, description="training steps of each candidate's probe")
    probe_batch_size: int = Field(32, ge=2)
    probe_lr: FiniteFloat = Field(1e-3, gt=0)
    random_seed: int = Field(0, description="the probe's head initialisation and batch order")

    @model_validator(mode="after")
    def _zero_shot_is_retrieval(self) -> Self:
        if self.kind == "retrieval" and self.task != "retrieval":
            raise ValueError(f"zero-shot scoring is retrieval only; probe {self.task!r} with kind 'probe'")
        return self


class RetrievalScorer:
    """Zero-shot retrieval of a merged state dict, in memory: the task (its data and tokenised
    validation examples) is built once; each candidate gets a model and keeps the checkpoint's heads,
    as `vlmerge evaluate --task retrieval --split val` of the written file would."""

    metric = TASKS.get("retrieval").primary_metric

    def __init__(self, reader: CheckpointReader, data: DataConfig, overrides: Mapping[str, Any] | None = None) -> None:
        finetuned = reader.metadata.get("task")
        if finetuned not in (None, "retrieval"):
            raise ConfigError(f"{reader.path} was fine-tuned for {finetuned!r}; score it with a probe, not retrieval")
        self.config, self.task = _candidate_task(reader, data, "retrieval", overrides)
        names = head_names(reader)
        name = TASK_HEAD if TASK_HEAD in names else HEADS if HEADS in names else None
        if name is None:
            raise CheckpointError(
                f"{reader.path}: has no pre-training heads, which zero-shot retrieval scores with; use a probe"
            )
        self.head = self.task.make_head(self.config)
        state = _head_state(reader, name)
        if name == TASK_HEAD:
            self.head.load_state_dict(state, strict=True)
        else:
            self.task.init_head(self.head, state)
        self.head_prefixes = tuple(f"{name}." for name in names)
        _check_split(self.task, SPLIT, reader.path)

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Evaluation:
        model = VLTransformer(self.config)
        backbone = {key: value for key, value in tensors.items() if not key.startswith(self.head_prefixes)}
        model.load_state_dict(backbone, strict=True)
        return self.task.evaluate(model, self.head, SPLIT)


class ProbeScorer:
    """A linear probe of each merged state dict, by the fine-tuning code (`run_finetune` with
    `freeze_backbone`): it reads its init from a file, so each candidate is saved to a temporary
    folder, probed there on the training split, scored on validation, and deleted. The folder is
    beside `beside` (the tune's output) where given, so that the next run there removes one a kill
    left; in the system's temporary directory otherwise."""

    def __init__(
        self,
        reader: CheckpointReader,
        data: DataConfig,
        objective: TuneObjective,
        beside: str | os.PathLike | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.beside = beside
        self.metric = TASKS.get(objective.task).primary_metric
        self.config, task = _candidate_task(reader, data, objective.task, overrides)
        size = _check_split(task, TRAIN_SPLIT, reader.path)
        if size < objective.probe_batch_size:
            raise ConfigError(f"probe batch size {objective.probe_batch_size} exceeds the {size} training examples")
        _check_split(task, SPLIT, reader.path)
        self.metadata = {"format": "vlmerge", "config": self.config.model_dump_json()}
        self.metadata.update({key: reader.metadata[key] for key in CARRIED_METADATA if key in reader.metadata})
        self.finetune = {
            "task": objective.task,
            "steps": objective.probe_steps,
            "checkpoint_every": objective.probe_steps,
            "random_seed": objective.random_seed,
            "eval_split": SPLIT,
            "freeze_backbone": True,
            "data": data.model_dump(mode="json"),
            "optimizer": {"batch_size": objective.probe_batch_size, "lr": objective.probe_lr},
        }
        FinetuneConfig.parse({**self.finetune, "init": ""}, where="probe")

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Evaluation:
        with self._folder() as tmp:
            init = save_checkpoint(Path(tmp) / "candidate.safetensors", tensors, self.metadata)
            config = FinetuneConfig.parse({**self.finetune, "init": str(init)}, where="probe")
            return run_finetune(config, Path(tmp) / "probe", progress=False)

    def _folder(self) -> contextlib.AbstractContextManager:
        if self.beside is None:
            return tempfile.TemporaryDirectory(prefix="vlmerge-tune-")
        return scratch_folder(self.beside)


def _candidate_task(
    reader: CheckpointReader, data: DataConfig, name: str, overrides: Mapping[str, Any] | None = None
) -> tuple[ModelConfig, Task]:
    """The merged model's config (`overrides`: the merge's, for a released file) and the task over the
    data, checked against each other (as `load_task`)."""
    task_class = TASKS.get(name)
    check_data(data, [task_class.use])
    config = checkpoint_config(reader, overrides)
    if config is None:
        raise CheckpointError(f"{reader.path}: no model config in its metadata; cannot build merged models to score")
    config = config.agnostic()
    if config.image_size != data.image_size:
        raise ConfigError(
            f"{reader.path}: the model takes {config.image_size}px images but the data is "
            f"{data.image_size}px; set data.image_size: {config.image_size}"
        )
    tokenizer = checkpoint_tokenizer(reader, config.max_text_len)
    return config, task_class(load_source(data), tokenizer)


def _check_split(task: Task, split: str, path: Path) -> int:
    size = task.num_examples(split)
    if size == 0:
        raise ConfigError(f"{path}: the data's {split} split is empty; nothing to score candidates on")
    return size


def _head_state(reader: CheckpointReader, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {key[len(prefix) :]: reader.get(key) for key in reader.keys if key.startswith(prefix)}
