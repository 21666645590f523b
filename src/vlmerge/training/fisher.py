"""Diagonal Fisher statistics of a checkpoint's experts under its own pre-training loss, for Fisher
merging (`vlmerge fisher`).

The estimator is the empirical Fisher of the checkpoint's pre-training objective, one term per
batch: for each batch b of B image-text pairs, g_b = d L_b / d theta, where L_b is the weighted sum
of the objectives its recipe trained with (ITC, ITC-vl, ITM, MLM, each a mean over the batch, as in
training), and F = (1 / n) sum_b g_b * g_b over the n batches, summed in float64. Per batch, not per
example: ITC and ITM score each pair against the others of its batch (in-batch negatives, hard
negatives drawn from the batch), so no per-example gradient of them exists; FusionBench squares
batch gradients too. F is then the diagonal of the second moment of a batch gradient at batch size
B (B times smaller than a per-example Fisher, equally for every expert, which the merge's ratio
cancels). Every batch has B pairs (a shorter last one is left out: it would estimate the Fisher at
another batch size).

An expert's parameters get gradient only through the tokens routed to it, so each expert's Fisher
is that of its own tokens. MLM masks and ITM negatives come from a generator seeded per batch
(`random_seed`, the batch's index), so a file is reproducible and does not depend on the number of
processes: under torchrun each rank takes every world_size-th batch and the sums are all-reduced.
"""

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.core.threads import one_thread
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import load_pairs
from vlmerge.io.atomic import check_output_path
from vlmerge.io.checkpoint import CheckpointReader, open_checkpoint
from vlmerge.io.statistics import save_fisher
from vlmerge.merging.plan import parse_expert_key
from vlmerge.models.checkpoint import load_head_state, load_model
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext, init_distributed
from vlmerge.training.grams import data_files
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, PretrainingObjective
from vlmerge.training.pretrain import HEADS
from vlmerge.training.setup import PairData, checkpoint_data, checkpoint_tokenizer
from vlmerge.training.trainer import step_generator

ESTIMATOR = (
    "mean over batches of the squared gradient of each batch's pre-training loss "
    "(the recipe's weighted objectives, each a mean over the batch)"
)


@dataclass(frozen=True)
class FisherStatistics:
    """The diagonal Fisher of each expert tensor and, per tensor, how many batches reached it."""

    fisher: dict[str, torch.Tensor]  # expert tensor key -> (1/n) sum_b g_b^2, float64 on the CPU
    info: dict[str, dict[str, Any]]  # key -> {"modality": "v", "batches": batches whose loss reached it}
    batches: int


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a merge combines: every tensor of a modality expert, by its key."""
    found = {name: p for name, p in model.named_parameters() if parse_expert_key(name) is not None}
    if not found:
        raise CheckpointError("the model has no modality experts; Fisher statistics are for merging them")
    return found


@one_thread()  # the same bytes on every machine (core/threads.py)
def collect_fisher(
    objective: PretrainingObjective,
    batches: Iterable[tuple[int, PairBatch]],
    *,
    random_seed: int = 0,
    progress: bool = False,
    dist_context: DistributedContext = SINGLE_PROCESS,
) -> FisherStatistics:
    """Accumulate g_b^2 of every expert parameter over `(index, batch)` pairs; the index seeds the
    batch's MLM masks and ITM negatives. Parameters and their `.grad` are left as they were."""
    parameters = expert_parameters(objective.model)
    was_training = objective.training
    objective.eval()  # no dropout; the objectives read no other mode
    sums = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in parameters.items()}
    reached = dict.fromkeys(parameters, 0)
    count = 0
    for index, batch in tqdm(batches, desc="fisher", disable=not progress, unit="batch"):
        generator = step_generator(random_seed, index, "fisher", device=batch.images.device)
        loss = objective(batch, generator)["loss"]
        gradients = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for key, gradient in zip(parameters, gradients):
            if gradient is not None:  # None: no token of this batch reached the expert
                sums[key].add_(gradient.detach().to(torch.float64).square())
                reached[key] += 1
        count += 1
    objective.train(was_training)
    count, reached = _all_reduce(sums, reached, count, dist_context)
    if count == 0:
        raise ConfigError("no batch to compute Fisher statistics from")
    info = {key: {"modality": parse_expert_key(key).modality.value, "batches": reached[key]} for key in sums}
    return FisherStatistics({key: (s / count).cpu() for key, s in sums.items()}, info, count)


def _all_reduce(
    sums: dict[str, torch.Tensor], reached: dict[str, int], count: int, context: DistributedContext
) -> tuple[int, dict[str, int]]:
    """Sum the squared gradients, batch counts and per-tensor counts over the process group, every
    rank every tensor in one order (zeros where its batches reached none)."""
    if not context.is_distributed:
        return count, reached
    for key in sorted(sums):
        dist.all_reduce(sums[key])
    device = next(iter(sums.values())).device
    counts = torch.tensor([count, *(reached[key] for key in sorted(reached))], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    totals = [int(value) for value in counts.tolist()]
    return totals[0], dict(zip(sorted(reached), totals[1:]))


def fisher_batches(pairs: PairData, batch_size: int, context: DistributedContext) -> Iterator[tuple[int, PairBatch]]:
    """This rank's share of the full batches (consecutive slices, in order), with their global index."""
    full = len(pairs) // batch_size
    for index in range(context.rank, full, context.world_size):
        yield index, pairs[slice(index * batch_size, (index + 1) * batch_size)].to(context.device)


def checkpoint_objectives(reader: CheckpointReader) -> ObjectiveWeights:
    """The objective weights the checkpoint was pre-trained with (its run config), else the defaults."""
    run_config = reader.metadata_json("run_config", {})
    objectives = run_config.get("objectives", {}) if isinstance(run_config, dict) else {}
    return ObjectiveWeights.parse(objectives, where=f"{reader.path} run_config objectives")


def load_pretraining_objective(checkpoint: str | os.PathLike, reader: CheckpointReader) -> PretrainingObjective:
    """The checkpoint's model and pre-training heads under its recipe's objectives."""
    model = load_model(checkpoint)
    state = load_head_state(checkpoint, HEADS)
    if state is None:
        raise CheckpointError(
            f"{checkpoint}: carries no pre-training heads ({HEADS!r}); Fisher statistics need its "
            "pre-training loss (a modality-specific checkpoint from `vlmerge train specific` has them)"
        )
    heads = PretrainingHeads(model.config.width, model.config.vocab_size)
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{checkpoint}: its pre-training heads do not fit the model ({detail})") from None
    mask_id = checkpoint_tokenizer(reader, model.config.max_text_len).mask_id
    return PretrainingObjective(model, heads, checkpoint_objectives(reader), mask_id)


def collect_checkpoint_fisher(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    data: DataConfig | None = None,
    split: str = "train",
    batch_size: int = 32,
    random_seed: int = 0,
    progress: bool = True,
    dist_context: DistributedContext | None = None,
    data_file: str | os.PathLike | None = None,
) -> Path:
    """Collect and save the Fisher file, recording where it came from (checkpoint, data, batches).

    As for Gram files: `out` is checked before any work (not the checkpoint, the data config file
    `data_file` or a file its datasets read), the file appears only once the pass is complete, and
    the recorded hash is of the checkpoint's open file."""
    if batch_size < 2:
        raise ConfigError(
            f"--batch-size must be at least 2 (ITM draws each pair's negatives from its batch), got {batch_size}"
        )
    check_output_path(out, [checkpoint, *data_files(data_file, data)])
    context = dist_context or init_distributed()
    reader = open_checkpoint(checkpoint)
    objective = load_pretraining_objective(checkpoint, reader).to(context.device)
    reader.check_unchanged()  # the model was read from the file `reader` holds open
    data = data or checkpoint_data(reader)
    pairs = PairData.of(
        load_pairs(data, split, progress=progress and context.is_main),
        checkpoint_tokenizer(reader, objective.model.config.max_text_len),
    )
    if len(pairs) < batch_size:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {len(pairs)} pairs of the {split} split")
    statistics = collect_fisher(
        objective,
        fisher_batches(pairs, batch_size, context),
        random_seed=random_seed,
        progress=progress and context.is_main,
        dist_context=context,
    )
    provenance = {
        "checkpoint": {"path": str(checkpoint), "sha256": reader.sha256()},
        "data": {**data.model_dump(mode="json"), "split": split, "examples": statistics.batches * batch_size},
        "batches": statistics.batches,
        "batch_size": batch_size,
        "objectives": objective.weights.model_dump(mode="json"),
        "random_seed": random_seed,
        "estimator": ESTIMATOR,
    }
    with context.together():  # a write that fails on the main process ends the others too
        if context.is_main:
            save_fisher(out, statistics.fisher, statistics.info, provenance)
    return Path(out)
