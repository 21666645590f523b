"""One explicit training loop: checkpoint, resume, metrics as JSON lines, a progress bar.

Everything random in a step derives from (seed, step) (see `step_generator` and
`batch_indices`), so a run killed at any point and resumed from its last checkpoint ends
with the same weights as a run never killed. Checkpoints are written atomically, and checked
before a resume trusts them: this run's modules and shapes, finite values, an optimizer state,
a step within the run and not before the one the run directory's manifest last recorded.
"""

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vlmerge.core.errors import CheckpointError
from vlmerge.core.numerics import all_finite
from vlmerge.io.atomic import atomic_path
from vlmerge.io.input_file import InputFile
from vlmerge.io.torch_file import check_torch_file
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext
from vlmerge.training.run_directory import (
    CHECKPOINT,
    CHECKPOINT_MANIFEST,
    MANIFEST_FILE,
    read_manifest,
    update_manifest,
)

METRICS = "metrics.jsonl"
KERNEL_CHOICES = ("foreach", "fused")  # optimizer settings that choose kernels, kept over a checkpoint's
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
        parameters = self._parameters()
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
                nn.utils.clip_grad_norm_(parameters, self.grad_clip, foreach=True)  # the loop's bytes
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            logged = self.dist.average({k: float(v.detach()) for k, v in losses.items()})
            record = {"step": step, **{k: round(v, 6) for k, v in logged.items()}}
            if self.dist.is_main:
                self._append_metrics(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)  # drawn at tqdm's own interval
            if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps:
                self.save(step + 1)
        return self.steps - start

    def _parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    def save(self, step: int) -> None:
        """Rank 0 writes; the others wait so that no rank runs ahead of the file on disk (and stop with it
        when the write fails)."""
        with self.dist.together():
            if self.dist.is_main:
                self._write(step)

    def _write(self, step: int) -> None:
        """The checkpoint, carrying the run's manifest as of this step: a resume whose manifest.json is
        lost still knows which config, inputs and tokenizer the weights were trained with."""
        manifest = read_manifest(self.run_dir)
        state = {
            "step": step,
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        if manifest is not None:
            state[CHECKPOINT_MANIFEST] = asdict(replace(manifest, step=step))
        with atomic_path(self.checkpoint_path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)  # through a handle: the archive is not named after the temporary file
        # After the file: a crash between the two leaves the manifest's step behind, never ahead.
        update_manifest(self.run_dir, step=step)

    def resume(self) -> int:
        """Load the last checkpoint if there is one (checked first); drop metrics logged after it. Every
        rank checks it; a refusal is reported once, by the first rank that refused."""
        with self.dist.together():
            return self._resume()

    def _resume(self) -> int:
        manifest = read_manifest(self.run_dir)
        recorded = manifest.step if manifest is not None else 0
        if not self.checkpoint_path.exists():
            if recorded:
                raise CheckpointError(
                    f"{self.checkpoint_path}: missing, but the run checkpointed step {recorded} ({MANIFEST_FILE}); "
                    "restore it or use a new run directory"
                )
            if self.dist.is_main:
                self._truncate_metrics(0)
            return 0
        state = self._checked_state(recorded)
        try:
            for name, module in self.modules.items():
                module.load_state_dict(state["modules"][name], strict=True)
            kernels = [
                {key: group[key] for key in KERNEL_CHOICES if key in group} for group in self.optimizer.param_groups
            ]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, own in zip(self.optimizer.param_groups, kernels):
                group.update(own)  # how this code runs the update, not how the checkpoint's writer did
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise self._refusal(f"its state does not fit this run ({_one_line(error)})") from None
        if self.dist.is_main:
            self._truncate_metrics(state["step"])
        return state["step"]

    def _refusal(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.checkpoint_path}: {why}; cannot resume from it (use a new run directory)")

    def _checked_state(self, recorded: int) -> dict[str, Any]:
        """The checkpoint's state, once it is known to be one of this run: read as tensors and plain data
        only, this run's modules with their shapes, finite values, a step in the run, an optimizer state."""
        if not zipfile.is_zipfile(self.checkpoint_path):  # what torch.save writes
            raise self._refusal("not a checkpoint written by torch.save (not a zip archive)")
        try:  # what torch.load trusts (records, sizes, pickle nesting) is checked before it runs
            with InputFile(self.checkpoint_path) as file:
                check_torch_file(file)
        except CheckpointError as error:
            raise self._refusal(str(error).removeprefix(f"{self.checkpoint_path}: ")) from None
        try:
            state = torch.load(self.checkpoint_path, map_location=self.dist.device, weights_only=True)
        except pickle.UnpicklingError:
            raise self._refusal(
                "it holds objects other than tensors and plain data, which are never unpickled"
            ) from None
        except Exception as error:  # torch raises whatever its zip and pickle readers raise
            raise self._refusal(f"not a readable checkpoint ({_one_line(error)})") from None
        if not isinstance(state, dict):
            raise self._refusal(f"it holds a {type(state).__name__}, not a dict of step, modules and optimizer")
        if missing := [key for key in ("step", "modules", "optimizer") if key not in state]:
            raise self._refusal(f"it has no {', '.join(missing)}")
        step = state["step"]
        if type(step) is not int or not 0 <= step <= self.steps:
            raise self._refusal(f"its step {step!r} is not a step of this {self.steps}-step run")
        if step < recorded:
            raise self._refusal(f"it holds step {step}, but the run had checkpointed step {recorded} ({MANIFEST_FILE})")
        self._check_modules(state["modules"])
        self._check_optimizer(state["optimizer"])
        return state

    def _check_modules(self, saved: Any) -> None:
        if not isinstance(saved, dict) or set(saved) != set(self.modules):
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise self._refusal(f"it holds modules {found}, this run trains {sorted(self.modules)}")
        for name, module in self.modules.items():
            expected, tensors = module.state_dict(), saved[name]
            if not isinstance(tensors, dict):
                raise self._refusal(f"its {name} is a {type(tensors).__name__}, not a state dict")
            problems = [f"{name}.{key} missing" for key in expected if key not in tensors]
            problems += [f"{name}.{key} unexpected" for key in tensors if key not in expected]
            problems += [
                f"{name}.{key} {_shape(tensors[key])}, the model's {tuple(value.shape)}"
                for key, value in expected.items()
                if key in tensors and _shape(tensors[key]) != tuple(value.shape)
            ]
            if problems:
                more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
                raise self._refusal(f"not a checkpoint of this model ({'; '.join(problems[:2])}{more})")
            if bad := [key for key, value in tensors.items() if not all_finite(value)]:
                raise self._refusal(f"{name}.{bad[0]} holds NaN or infinite values")

    def _check_optimizer(self, saved: Any) -> None:
        """A state dict for this optimizer's groups, its per-parameter tensors finite and shaped like them."""
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
            raise self._refusal("its optimizer is not an optimizer state dict")
        ours = self.optimizer.param_groups
        if len(groups) != len(ours) or any(
            not isinstance(g, dict) or len(g.get("params", ())) != len(o["params"]) for g, o in zip(groups, ours)
        ):
            raise self._refusal("its optimizer state has other parameter groups than this run's")
        for group, own in zip(groups, ours):
            for index, parameter in zip(group["params"], own["params"]):
                entry = saved["state"].get(index)
                for key, value in entry.items() if isinstance(entry, dict) else ():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != parameter.shape:
                        raise self._refusal(
                            f"its optimizer's {key} of parameter {index} has shape {tuple(value.shape)}"
                        )
                    if isinstance(value, torch.Tensor) and not all_finite(value):
                        raise self._refusal(f"its optimizer's {key} of parameter {index} holds NaN or infinite values")

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


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _one_line(error: BaseException) -> str:
    """The first line of an error's message (torch's run to many, with advice to unpickle anyway)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
