"""One explicit training loop: checkpoint, resume, metrics as JSON lines, a progress bar.

Everything random in a step derives from (seed, step) (see `step_generator` and
`batch_indices`), so a run killed at any point and resumed from its last checkpoint ends
with the same weights as a run never killed. Checkpoints are written atomically.
"""

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vlmerge.core.errors import CheckpointError
from vlmerge.io.atomic import atomic_path
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
StepFn = Callable[[int], dict[str, torch.Tensor]]


def step_generator(seed: int, step: int, purpose: str = "", device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on the run seed, the step and what it is for."""
    digest = hashlib.sha256(f"{seed}:{step}:{purpose}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The examples of batch `step`: consecutive slices of a per-epoch seeded permutation."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=step_generator(seed, epoch, "epoch"))
    return order[position * batch_size : (position + 1) * batch_size]


class Trainer:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        steps: int,
        checkpoint_every: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        progress: bool = True,
        grad_clip: float | None = None,
        dist: DistributedContext = SINGLE_PROCESS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.grad_clip = grad_clip
        self.dist = dist
        self.modules = modules
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.steps = steps
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def fit(self, step_fn: StepFn) -> int:
        """Run from the last checkpoint (or step 0) to `steps`; return the number of steps run now."""
        start = self.resume()
        for module in self.modules.values():
            module.train()
        bar = tqdm(
            range(start, self.steps),
            initial=start,
            total=self.steps,
            desc=self.run_dir.name,
            disable=not (self.progress and self.dist.is_main),
            unit="step",
        )
        for step in bar:
            losses = step_fn(step)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self._parameters(), self.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            logged = self.dist.average({k: float(v.detach()) for k, v in losses.items()})
            record = {"step": step, **{k: round(v, 6) for k, v in logged.items()}}
            if self.dist.is_main:
                self._append_metrics(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps:
                self.save(step + 1)
        return self.steps - start

    def _parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    def save(self, step: int) -> None:
        """Rank 0 writes; the others wait so that no rank runs ahead of the file on disk."""
        if not self.dist.is_main:
            self.dist.barrier()
            return
        state = {
            "step": step,
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)
        self.dist.barrier()

    def resume(self) -> int:
        """Load the last checkpoint if there is one; drop metrics logged after it."""
        if not self.checkpoint_path.exists():
            if self.dist.is_main:
                self._truncate_metrics(0)
            return 0
        try:
            state = torch.load(self.checkpoint_path, map_location=self.dist.device, weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{self.checkpoint_path}: cannot resume from this checkpoint ({error})") from error
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.dist.is_main:
            self._truncate_metrics(state["step"])
        return int(state["step"])

    def _append_metrics(self, record: dict) -> None:
        with open(self.run_dir / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / METRICS
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) < step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
