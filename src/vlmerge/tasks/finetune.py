"""Stage 4 of the recipe: fine-tune a checkpoint (pre-trained, modality-specific or merged)
on one task, or train a linear probe on it (the task head alone, the model frozen), then
evaluate it; and evaluation of a saved checkpoint on its own.

A run's results.json holds the task, split, init, steps and the evaluation: its `metrics` and
its per-example `samples` (see `vlmerge.tasks.base.Evaluation`); `read_evaluation` reads it.
"""

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import check_data, load_source
from vlmerge.io.atomic import atomic_path
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.models.checkpoint import load_head_state, load_model, save_model
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, Evaluation, Task
from vlmerge.training.config import FinetuneConfig, read_yaml
from vlmerge.training.distributed import DistributedContext, init_distributed
from vlmerge.training.pretrain import HEADS, MODEL_FILE
from vlmerge.training.run_directory import CONFIG_FILE, RunDirectory, open_run_dir
from vlmerge.training.setup import checkpoint_data, checkpoint_tokenizer, make_optimizer, resolve_data
from vlmerge.training.trainer import Trainer, batch_indices

TASK_HEAD = "head"
RESULTS_FILE = "results.json"


class TaskObjective(nn.Module):
    """Model, head and task loss as one module, so DistributedDataParallel sees one forward per step."""

    def __init__(self, model: VLTransformer, head: nn.Module, task: Task, dist: DistributedContext) -> None:
        super().__init__()
        self.model, self.head, self.task, self.dist = model, head, task, dist

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.task.loss(self.model, self.head, batch, self.dist)


def load_task(
    name: str, checkpoint: str | os.PathLike, data: DataConfig, seed: int = 0, progress: bool = False
) -> tuple[VLTransformer, Task]:
    """The checkpoint's model and the task over the data, checked against each other."""
    task_class = TASKS.get(name)
    check_data(data, [task_class.use])
    model = load_model(checkpoint)
    if model.config.image_size != data.image_size:
        raise ConfigError(
            f"{checkpoint}: the model takes {model.config.image_size}px images but the data is "
            f"{data.image_size}px; set data.image_size: {model.config.image_size}"
        )
    tokenizer = checkpoint_tokenizer(open_checkpoint(checkpoint), model.config.max_text_len)
    return model, task_class(load_source(data, progress), tokenizer, seed)


def run_finetune(
    config: FinetuneConfig, run_dir: str | os.PathLike, progress: bool = True, dist: DistributedContext | None = None
) -> Evaluation:
    """Fine-tune (or resume), evaluate on `eval_split`; write the model and results.json. Returns
    the evaluation on the main process, an empty one on the others.

    With `freeze_backbone` (a linear probe) only the head trains, at the same rate as when
    fine-tuning (lr x head_lr_multiplier): the model gets no gradient and no optimizer state,
    and the saved checkpoint carries it unchanged. For retrieval the head is the contrastive
    projections (and temperature)."""
    dist = dist or init_distributed()
    run_dir = Path(run_dir)
    # The main process locks the run directory for the whole run and claims it once the checks pass.
    with open_run_dir(run_dir, config) if dist.is_main else contextlib.nullcontext() as run:
        return _finetune(config, run_dir, run, progress, dist)


def _finetune(
    config: FinetuneConfig, run_dir: Path, run: RunDirectory | None, progress: bool, dist: DistributedContext
) -> Evaluation:
    model, task = load_task(config.task, config.init, config.data, config.random_seed, progress and dist.is_main)
    torch.manual_seed(config.random_seed)
    head = (task.make_probe_head if config.freeze_backbone else task.make_head)(model.config)
    task.init_head(head, load_head_state(config.init, HEADS))
    model, head = model.to(dist.device), head.to(dist.device)
    if config.freeze_backbone:
        model.requires_grad_(False).eval()  # DDP then syncs the head's gradients alone
    trained = {"head": head} if config.freeze_backbone else {"model": model, "head": head}
    size = task.num_examples("train")
    if size < config.optimizer.batch_size:
        raise ConfigError(f"batch_size {config.optimizer.batch_size} exceeds the {size} training examples")
    if run is not None:
        run.claim()  # every check on the config has passed
    dist.barrier()
    # Tasks differ in which embeddings they use (e.g. no text for image classification).
    objective = dist.wrap(TaskObjective(model, head, task, dist), find_unused_parameters=True)
    backbone = [] if config.freeze_backbone else [model]
    optimizer, scheduler = make_optimizer(backbone, config.optimizer, config.steps, head=head)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        rows = batch_indices(size, config.optimizer.batch_size, step, config.random_seed)
        local = rows[dist.rows(len(rows))]
        return objective({name: tensor.to(dist.device) for name, tensor in task.batch("train", local).items()})

    Trainer(
        run_dir,
        trained,
        optimizer,
        config.steps,
        config.checkpoint_every,
        scheduler,
        progress=progress,
        grad_clip=config.optimizer.grad_clip,
        dist=dist,
    ).fit(step_fn)
    evaluation = Evaluation({}, {})
    if dist.is_main:
        evaluation = task.evaluate(model, head, config.eval_split, config.eval_batch_size)
        metadata = {"stage": "finetune", "task": config.task, "tokenizer": task.tokenizer.to_json()}
        save_model(model, run_dir / MODEL_FILE, step=config.steps, extra_metadata=metadata, heads={TASK_HEAD: head})
        write_results(
            run_dir / RESULTS_FILE,
            {
                "task": config.task,
                "split": config.eval_split,
                "init": config.init,
                "steps": config.steps,
                "freeze_backbone": config.freeze_backbone,
                **evaluation.as_dict(),
            },
        )
    dist.barrier()
    return evaluation


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    task_name: str | None = None,
    split: str = "test",
    data: DataConfig | None = None,
    batch_size: int = 128,
) -> Evaluation:
    """A fine-tuned checkpoint on its task, or a pre-trained / merged one zero-shot (retrieval
    with its contrastive heads: the only task that needs no task head)."""
    reader = open_checkpoint(checkpoint)
    finetuned_task = reader.metadata.get("task")
    task_name = task_name or finetuned_task or "retrieval"
    if finetuned_task is not None and task_name != finetuned_task:
        raise ConfigError(f"{checkpoint} was fine-tuned for {finetuned_task!r}, not {task_name!r}")
    data = data or checkpoint_data(reader)
    model, task = load_task(task_name, checkpoint, data)
    head_state = load_head_state(checkpoint, TASK_HEAD)
    if head_state is not None:
        head = task.restore_head(model.config, head_state)
    elif task_name == "retrieval" and (pretraining := load_head_state(checkpoint, HEADS)) is not None:
        head = task.make_head(model.config)
        task.init_head(head, pretraining)
    else:
        raise CheckpointError(
            f"{checkpoint}: has no head for {task_name!r}; fine-tune it first with `vlmerge train "
            "finetune` (zero-shot evaluation is retrieval with the pre-training heads)"
        )
    return task.evaluate(model, head, split, batch_size)


def run_checkpoint(path: str | os.PathLike) -> Path:
    """The model a path names: a checkpoint file, or a run directory's model.safetensors."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def evaluate_path(
    path: str | os.PathLike,
    task_name: str | None = None,
    split: str = "test",
    data: str | os.PathLike | None = None,
    limit: int | None = None,
) -> Evaluation:
    """`evaluate_checkpoint` of a checkpoint or a run directory. Without `data`, a run directory is
    evaluated on the data in its config; otherwise `data` is a dataset name (default emoji) or a
    YAML data config (see `resolve_data`), cut to the first `limit` records."""
    path, checkpoint = Path(path), run_checkpoint(path)
    if data is None and path.is_dir() and (path / CONFIG_FILE).is_file():  # a run directory: the run's data
        data_config = DataConfig.parse(read_yaml(path / CONFIG_FILE).get("data", {}), where=str(path / CONFIG_FILE))
    else:
        data_config = resolve_data(data, checkpoint, limit)
    return evaluate_checkpoint(checkpoint, task_name, split, data_config)


def read_evaluation(path: str | os.PathLike) -> Evaluation:
    """The evaluation in a fine-tuning run's results.json (given the file or its run directory)."""
    path = Path(path)
    path = path / RESULTS_FILE if path.is_dir() else path
    try:
        return Evaluation.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such results file; has the fine-tuning run finished?") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a fine-tuning results file ({error!r})") from None


def write_results(path: Path, results: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
