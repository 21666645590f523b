"""Data-parallel training with PyTorch's own engine (torchrun + DistributedDataParallel).

Every rank reads the same global batch (the examples of a step depend only on the seed and
the step) and computes on its own rows. Losses are written so that DDP's gradient average
over ranks equals the gradient of the single-process loss on the global batch:

- a loss that is a mean over equally many rows per rank needs nothing (DDP averages);
- a mean over a varying number of items (masked tokens) uses `global_mean`;
- a loss over the whole batch (contrastive) uses `gather`: features of every rank, with
  gradients flowing back to the rank that computed them.

Checks that run on one rank (the main one claims the run directory, writes the files) sit in a
`together()` block: its outcome reaches every rank, so a failure ends them all, reported once.
"""

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmerge.core.errors import ConfigError, VlmergeError


class PeerFailure(VlmergeError):
    """This process stops because another process of the job failed: that one reports the error, so
    the job's output holds it once (the command line prints nothing more for this one)."""

    def __init__(self, rank: int | None) -> None:
        who = f"process {rank}" if rank is not None else "another process"
        super().__init__(f"{who} of the job failed (its error says why)")
        self.rank = rank


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, global_batch: int) -> slice:
        """This rank's rows of a global batch; the batch must split evenly."""
        if global_batch % self.world_size:
            raise ConfigError(f"global batch {global_batch} does not split over {self.world_size} processes")
        local = global_batch // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows, in rank order; gradients return to their rank.

        Every rank then computes the same global loss; the all-gather's backward sums the
        ranks' gradients (x world size) and DDP's average divides it back out.
        """
        if not self.is_distributed:
            return tensor
        return torch.cat(dist_fn.all_gather(tensor), dim=0)

    def global_mean(self, total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        """`total / count` over all ranks, as a per-rank loss whose DDP average is that mean."""
        count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
        if self.is_distributed:
            count = count.clone()
            dist.all_reduce(count)
        return total * self.world_size / count.clamp(min=1)

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of per-rank logged values (what a single process would have logged)."""
        if not self.is_distributed:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world_size).tolist()))

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """`module` under DistributedDataParallel when there are several processes."""
        if not self.is_distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    def barrier(self) -> None:
        """Wait for every rank; a rank that died meanwhile is a PeerFailure, not gloo's traceback."""
        if self.is_distributed:
            try:
                dist.barrier()
            except RuntimeError:  # the backend's errors (a closed connection) are RuntimeErrors
                raise PeerFailure(None) from None

    @contextmanager
    def together(self) -> Iterator[None]:
        """A block whose outcome every rank shares, ending in a barrier: if it raises on some ranks, the
        first of them raises its error and every other rank a PeerFailure. Without it a check that fails
        on the main rank alone (say, a run directory of another config) leaves the others waiting for it."""
        try:
            yield
        except Exception:
            first = self._first_failed(failed=True)
            if first is not None and first != self.rank:
                raise PeerFailure(first) from None
            raise
        first = self._first_failed(failed=False)
        if first is not None:
            raise PeerFailure(first)

    def _first_failed(self, failed: bool) -> int | None:
        """The lowest rank that failed, from every rank's word (None: none did)."""
        if not self.is_distributed:
            return self.rank if failed else None
        word = torch.tensor([self.rank if failed else self.world_size], device=self.device)
        try:
            dist.all_reduce(word, op=dist.ReduceOp.MIN)
        except RuntimeError:  # a rank died without its word
            if failed:
                return self.rank
            raise PeerFailure(None) from None
        first = int(word.item())
        return first if first < self.world_size else None


SINGLE_PROCESS = DistributedContext()


def init_distributed() -> DistributedContext:
    """The context torchrun describes in the environment (one process when it is absent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_end_process_group)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), device)


def _end_process_group() -> None:
    """At exit, before the interpreter tears down: a process group left to the C++ runtime's own teardown
    can abort a process that is exiting on an error ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()
