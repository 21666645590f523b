"""`vlmerge adamerge`: the coefficients of a task-vector merge learnt from unlabeled image-text pairs.

AdaMerging (Yang et al., ICLR 2024) learns one λ per layer and task of θ = θ₀ + Σ_m λ_m τ_m by
minimising its merged model's prediction entropy on unlabeled inputs. Here the tasks are the experts:
τ_m = θ_m − θ_seed for each modality expert m of a layer, and λ is learnt per layer (`granularity`
"layer": θ = θ_seed + λ_layer Σ_m τ_m) or per layer and expert ("layer-expert"). The objective is
computed on the pairs of the validation split (or the training split; never the test split):

- `heldout` (the default): the checkpoint's own pre-training loss, ITC + ITC-vl + ITM + MLM weighted
  as its recipe weighs them (`training.objectives.pretraining_losses`). A pair is its own label, so
  the loss the experts and heads were trained with needs no annotation; it reaches every expert (v
  and l through the dual encoder, vl through ITC-vl, ITM and MLM) and, unlike an entropy, is not
  lowered by confident mistakes.
- `contrastive-entropy`: AdaMerging's objective carried over: the entropy of each image's softmax
  over its batch's texts and of each text's over the images (ITC, and ITC-vl where the recipe trains
  it, weighted as the recipe weighs them). Fused pairs never reach it, and collapsing every
  prediction onto one wrong partner lowers it as much as finding the right one.

The merged model is loaded once, at the initial λ, and never copied: each step runs it through
`torch.func.functional_call` with the merged tensors θ(λ), a differentiable function of λ. λ is
optimised by Adam and kept in [0, 1] (AdaMerging clamps it so), one batch per step: the split's full
batches in order, cycled; the MLM masks and ITM negatives come from a generator seeded by the random
seed and the step, and torch runs on one thread, so a run gives the same bytes everywhere. Every
`checkpoint_every` steps λ and Adam's state are written atomically to a state file, from which a
later run with the same inputs and settings continues (a larger `steps` extends a finished run): a
resumed run equals an uninterrupted one.

The learnt λ is written as a coefficient spec of `arithmetic`'s `lam` (merging/coefficients.py): a
gradient over depth with one value per layer (layer i lies on the i-th value, up to the rounding of
i / (L - 1)), by expert for "layer-expert". The merged file is written by the merge engine from that
spec, so `vlmerge merge SOURCE --seed-checkpoint SEED --method arithmetic --lam "$(cat merged.lam.json)"`
writes the same tensors, bit for bit; its merge record holds the run under `adamerge`.
"""

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.core.modality import ALL_MODALITIES, Modality
from vlmerge.core.threads import one_thread
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import load_pairs
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.atomic import atomic_path, check_output_path
from vlmerge.merging.engine import MergeFiles, MergeRequest, MergeResult, PreparedMerge, write_merge
from vlmerge.merging.plan import MergePlan
from vlmerge.merging.prepared_merge import group_inputs
from vlmerge.models.checkpoint import head_names
from vlmerge.models.heads import PretrainingHeads
from vlmerge.models.transformer import VLTransformer
from vlmerge.training.fisher import checkpoint_objectives
from vlmerge.training.grams import data_files
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, contrastive_logits, pretraining_losses
from vlmerge.training.pretrain import HEADS
from vlmerge.training.setup import PairData, checkpoint_data, checkpoint_tokenizer
from vlmerge.training.trainer import step_generator

METHOD = "arithmetic"  # θ_seed + Σ_m λ_m τ_m: the merge whose coefficients are learnt
STATE_FORMAT = "vlmerge-adamerge-state"
Objective = Literal["heldout", "contrastive-entropy"]
Granularity = Literal["layer", "layer-expert"]


class AdaMergeConfig(StrictConfig):
    """How λ is learnt. `steps` and `checkpoint_every` may change when a run is resumed; the rest
    name the run (a state file made with other values is refused)."""

    objective: Objective = Field(
        "heldout",
        description="the checkpoint's pre-training loss on the pairs (default), or the entropy of the in-batch "
        "image-to-text and text-to-image softmax (AdaMerging's objective)",
    )
    granularity: Granularity = Field("layer", description="one lambda per layer, or per layer and expert")
    split: Literal["val", "train"] = Field("val", description="the pairs lambda is learnt on (never the test split)")
    steps: int = Field(500, ge=1, description="Adam steps, one batch each (AdaMerging: 500)")
    lr: FiniteFloat = Field(1e-3, gt=0, description="Adam's learning rate (AdaMerging: 1e-3)")
    batch_size: int = Field(16, ge=2, description="pairs per step; ITC and ITM contrast a pair with its batch")
    init_lam: FiniteFloat = Field(0.3, ge=0, le=1, description="every lambda at the start (AdaMerging: 0.3)")
    random_seed: int = Field(0, description="seeds the MLM masks and ITM negatives")
    checkpoint_every: int = Field(50, ge=1, description="steps between writes of the state file")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return self.model_dump(mode="json", exclude={"steps", "checkpoint_every"})


@dataclass(frozen=True)
class AdaMergeResult:
    merge: MergeResult  # the written merge (its `path`)
    spec: Any  # the learnt λ as `vlmerge merge --method arithmetic --lam` takes it (JSON)
    spec_path: Path
    state_path: Path
    objective_start: float  # the objective over the split's full batches, merged at `init_lam`
    objective_end: float  # the same, merged with the learnt spec
    losses: tuple[float, ...]  # the objective of each step's batch, from the first step on
    resumed_from: int  # the step the run continued from (0: started afresh)


# --------------------------------------------------------------------------- λ and the merged tensors
@dataclass(frozen=True)
class TaskVectors:
    """One merged tensor as a function of λ: its origin and each expert's task vector, in float32."""

    target: str
    layer: int
    origin: torch.Tensor
    vectors: dict[Modality, torch.Tensor]


@dataclass(frozen=True)
class Coefficients:
    """Where the learnt values sit: λ has one row per layer and, per layer and expert, a column per
    modality (v, l, vl); per layer, one column that every expert of the layer takes."""

    granularity: Granularity
    num_layers: int
    experts: tuple[Modality, ...]  # the experts some merged tensor takes, in v, l, vl order
    used: dict[Modality, tuple[int, ...]]  # expert -> the layers where a merged tensor takes it

    @classmethod
    def of(cls, plan: MergePlan, granularity: Granularity) -> "Coefficients":
        used: dict[Modality, set[int]] = {}
        for group in plan.groups:
            if len(group.experts) > 1:
                for modality in group.experts:
                    used.setdefault(modality, set()).add(group.layer)
        if not used:
            raise ConfigError(f"the {plan.selection.value} selection merges no tensor of two experts: nothing to learn")
        experts = tuple(m for m in ALL_MODALITIES if m in used)
        return cls(granularity, plan.num_layers, experts, {m: tuple(sorted(used[m])) for m in experts})

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, len(ALL_MODALITIES) if self.granularity == "layer-expert" else 1)

    def column(self, modality: Modality) -> int:
        return ALL_MODALITIES.index(modality) if self.granularity == "layer-expert" else 0

    def spec(self, lam: torch.Tensor) -> Any:
        """λ as a spec of `lam`: a gradient with a value per layer (a number for one layer), by expert
        for "layer-expert", where a layer an expert is not merged at takes the nearest merged layer's
        value (no tensor reads it; a neighbour's rounding then changes nothing)."""
        if self.granularity == "layer":
            return _over_depth([float(value) for value in lam[:, 0]])
        spec = {}
        for modality in self.experts:
            used, column = self.used[modality], lam[:, self.column(modality)]
            nearest = [min(used, key=lambda layer: (abs(layer - i), layer)) for i in range(self.num_layers)]
            spec[modality.value] = _over_depth([float(column[layer]) for layer in nearest])
        return spec


def _over_depth(values: list[float]) -> float | list[float]:
    return values if len(values) > 1 else values[0]


def merged_tensors(
    vectors: list[TaskVectors], lam: torch.Tensor, coefficients: Coefficients
) -> dict[str, torch.Tensor]:
    """θ(λ) of every merged tensor: origin + Σ_m λ[layer, m] τ_m, differentiable in λ."""
    merged = {}
    for tensor in vectors:
        terms = [lam[tensor.layer, coefficients.column(m)] * vector for m, vector in tensor.vectors.items()]
        merged[tensor.target] = tensor.origin + sum(terms)
    return merged


# --------------------------------------------------------------------------- the objectives
def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of each row's softmax."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def contrastive_entropy(
    model: VLTransformer, heads: PretrainingHeads, batch: PairBatch, weights: ObjectiveWeights
) -> torch.Tensor:
    """The entropy of the image-to-text and text-to-image softmax over the batch, averaged, for ITC
    and (where the recipe weighs it) ITC-vl, in the recipe's proportion."""
    ids, mask = batch.text.ids, batch.text.mask
    contrasts = [
        (weights.itc, heads.itc_image, heads.itc_text, heads.logit_scale, False),
        (weights.itc_vl, heads.itc_vl_image, heads.itc_vl_text, heads.vl_logit_scale, True),
    ]
    total, weight_sum = None, 0.0
    for weight, image_head, text_head, scale, through_vl in contrasts:
        if not weight:
            continue
        image = image_head(model(images=batch.images, unimodal_through_vl=through_vl).cls)
        text = text_head(model(text_ids=ids, text_mask=mask, unimodal_through_vl=through_vl).cls)
        logits = contrastive_logits(image, text, scale)  # (B, B): images by rows, texts by columns
        entropy = weight * (softmax_entropy(logits) + softmax_entropy(logits.T)) / 2
        total, weight_sum = (entropy if total is None else total + entropy), weight_sum + weight
    return total / weight_sum


class UnlabeledObjective(nn.Module):
    """The merged model and the source's pre-training heads under one objective: a module, so that
    `functional_call` swaps the merged tensors in for every forward the objective makes."""

    def __init__(
        self, model: VLTransformer, heads: PretrainingHeads, weights: ObjectiveWeights, mask_id: int, kind: Objective
    ) -> None:
        super().__init__()
        self.model, self.heads = model, heads
        self.weights, self.mask_id, self.kind = weights, mask_id, kind

    def forward(self, batch: PairBatch, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "contrastive-entropy":
            return contrastive_entropy(self.model, self.heads, batch, self.weights)
        return pretraining_losses(self.model, self.heads, batch, self.weights, self.mask_id, generator)["loss"]


@dataclass(frozen=True)
class SplitBatches:
    """The split's full batches, in order (a shorter last one is left out: the contrastive losses
    would score its pairs against fewer others)."""

    pairs: PairData
    batch_size: int

    def __len__(self) -> int:
        return len(self.pairs) // self.batch_size

    def __getitem__(self, index: int) -> PairBatch:
        return self.pairs[slice(index * self.batch_size, (index + 1) * self.batch_size)]


def evaluate_objective(
    objective: UnlabeledObjective, tensors: dict[str, torch.Tensor], batches: SplitBatches, random_seed: int
) -> float:
    """The objective's mean over every full batch of the split, the model's tensors replaced by
    `tensors` (model keys), each batch's draws seeded by its index."""
    values = []
    with torch.no_grad():
        for index in range(len(batches)):
            generator = step_generator(random_seed, index, "adamerge-eval")
            values.append(float(_run(objective, tensors, batches[index], generator)))
    return sum(values) / len(values)


def _run(
    objective: UnlabeledObjective, tensors: dict[str, torch.Tensor], batch: PairBatch, generator: torch.Generator
) -> torch.Tensor:
    parameters = {f"model.{key}": value for key, value in tensors.items()}
    return functional_call(objective, parameters, (batch, generator))


# --------------------------------------------------------------------------- the state file
@dataclass
class LearningState:
    step: int
    lam: torch.Tensor
    optimizer: dict[str, Any] | None
    losses: list[float]


def load_state(path: Path, identity: str, steps: int) -> LearningState | None:
    """The state of the run `path` holds, if it is this run's (same identity); None if there is none."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        state = LearningState(int(saved["step"]), saved["lam"], saved["optimizer"], list(saved["losses"]))
        recorded = saved["identity"]
    except Exception as error:  # torch raises whatever its zip and pickle readers raise
        detail = " ".join(str(error).split())[:200]
        raise CheckpointError(
            f"{path}: not an adamerge state file ({detail}); delete it or give another --state"
        ) from None
    if recorded != identity:
        changed = _changed(json.loads(recorded), json.loads(identity))
        raise ConfigError(
            f"{path} holds a run with other inputs or settings ({', '.join(changed)} differ); "
            "delete it to start afresh, or give another --state"
        )
    if state.step > steps:
        raise ConfigError(f"{path} holds a run at step {state.step}, past --steps {steps}; give at least that many")
    return state


def save_state(path: Path, identity: str, state: LearningState) -> None:
    saved = {
        "format": STATE_FORMAT,
        "identity": identity,
        "step": state.step,
        "lam": state.lam.detach().clone(),
        "optimizer": state.optimizer,
        "losses": state.losses,
    }
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)


def _changed(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


# --------------------------------------------------------------------------- the command
def output_paths(
    out: str | os.PathLike,
    spec_out: str | os.PathLike | None,
    state: str | os.PathLike | None,
    inputs: list[str | os.PathLike],
) -> tuple[Path, Path]:
    """The spec's and the state file's paths (by default beside `out`: `merged.lam.json` and
    `merged.adamerge.pt` for `merged.safetensors`), every output checked before any work: writable,
    none of `inputs`, each its own file."""
    out = Path(out)
    spec_path, state_path = (
        Path(spec_out or out.with_suffix(".lam.json")),
        Path(state or out.with_suffix(".adamerge.pt")),
    )
    outputs = {"--out": out, "--spec-out": spec_path, "--state": state_path}
    by_place: dict[Path, str] = {}
    for flag, path in outputs.items():
        check_output_path(path, inputs)
        if (other := by_place.setdefault(path.resolve(), flag)) != flag:
            raise ConfigError(f"{flag} {path} is also {other}; give each output its own file")
    return spec_path, state_path


def split_batches(data: DataConfig, config: AdaMergeConfig, tokenizer: TextTokenizer, progress: bool) -> SplitBatches:
    """The pairs of `config.split` (never the test split), at least one full batch of them."""
    pairs = PairData.of(load_pairs(data, config.split, progress=progress), tokenizer)
    if len(pairs) < config.batch_size:
        raise ConfigError(
            f"the {config.split} split has {len(pairs)} pairs, fewer than one batch of --batch-size "
            f"{config.batch_size}; give a smaller batch or more data"
        )
    return SplitBatches(pairs, config.batch_size)


def adamerge_checkpoint(
    source: str | os.PathLike,
    *,
    seed_checkpoint: str | os.PathLike | None,
    out: str | os.PathLike,
    config: AdaMergeConfig | None = None,
    data: DataConfig | None = None,
    selection: str = "all",
    spec_out: str | os.PathLike | None = None,
    state: str | os.PathLike | None = None,
    data_file: str | os.PathLike | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> AdaMergeResult:
    """Learn λ of the arithmetic merge of `source` around `seed_checkpoint` on unlabeled pairs, and
    write the merge (`out`), its λ as a spec (`spec_out`) and the run's state (`state`; resumed from
    where it holds this run). `data`: default the emoji dataset at the source's image size;
    `data_file`: the YAML it came from, which no output may overwrite. `on_step(step, loss)` is called
    after every step (numbered from 1)."""
    config = config or AdaMergeConfig()
    if seed_checkpoint is None:
        raise ConfigError("adamerge learns the coefficients of task vectors from the seed: give --seed-checkpoint")
    spec_path, state_path = output_paths(out, spec_out, state, [source, seed_checkpoint, *data_files(data_file, data)])
    request = MergeRequest.of(source, seed_checkpoint=seed_checkpoint, selection=selection)
    files = MergeFiles.open(request)
    reader = files.reader
    if HEADS not in head_names(reader):
        raise CheckpointError(
            f"{source}: carries no pre-training heads ({HEADS!r}); adamerge scores merges with its pre-training "
            "objectives (a modality-specific checkpoint from `vlmerge train specific` has them)"
        )
    start = files.prepare(METHOD, {"lam": config.init_lam})  # the merge checked, before any tensor is read
    if start.config is None:
        raise CheckpointError(f"{source}: carries no model config; adamerge needs the model to score merges")
    coefficients = Coefficients.of(start.plan, config.granularity)
    weights = checkpoint_objectives(reader)
    if config.objective == "contrastive-entropy" and not (weights.itc or weights.itc_vl):
        raise ConfigError(f"{source} was trained without ITC or ITC-vl: there is no contrastive entropy to learn from")
    tokenizer = checkpoint_tokenizer(reader, start.config.max_text_len)
    data = data or checkpoint_data(reader)
    batches = split_batches(data, config, tokenizer, progress)
    identity = json.dumps(
        {
            "settings": config.identity(),
            "selection": request.selection.value,
            "data": data.model_dump(mode="json"),
            "source": reader.sha256(),
            "seed_checkpoint": files.origin.sha256(),
        },
        sort_keys=True,
    )
    resumed = load_state(state_path, identity, config.steps)
    with one_thread():  # the same bytes on every machine (core/threads.py)
        objective, vectors = build_objective(start, weights, tokenizer.mask_id, config.objective)
        learnt = learn(
            objective, vectors, coefficients, batches, config, resumed, state_path, identity, on_step, progress
        )
        spec = coefficients.spec(learnt.lam)
        objective_start = evaluate_objective(objective, {}, batches, config.random_seed)  # the model holds the start
        merged = dict(files.prepare(METHOD, {"lam": spec}).tensors())  # what is written, merged by the engine
        final = {tensor.target: merged[tensor.target].float() for tensor in vectors}
        del merged
        objective_end = evaluate_objective(objective, final, batches, config.random_seed)
    record = {
        "adamerge": {
            **config.model_dump(mode="json"),
            "data": {**data.model_dump(mode="json"), "split": config.split, "pairs": len(batches) * config.batch_size},
            "objective_weights": weights.model_dump(mode="json"),
            "objective_start": objective_start,
            "objective_end": objective_end,
        }
    }
    with atomic_path(spec_path) as tmp:
        tmp.write_text(json.dumps(spec, indent=1) + "\n")
    result = write_merge(files.prepare(METHOD, {"lam": spec}), out, progress=progress, record=record)
    return AdaMergeResult(
        result,
        spec,
        spec_path,
        state_path,
        objective_start,
        objective_end,
        tuple(learnt.losses),
        resumed.step if resumed is not None else 0,
    )


def build_objective(
    start: PreparedMerge, weights: ObjectiveWeights, mask_id: int, kind: Objective
) -> tuple[UnlabeledObjective, list[TaskVectors]]:
    """The agnostic model holding the merge at the initial λ, the source's pre-training heads, both
    frozen and in float32; and the task vectors of every tensor merged from two experts or more."""
    state = dict(start.tensors())
    head_prefixes = tuple(f"{name}." for name in head_names(start.reader))
    model = VLTransformer(start.config.agnostic())
    backbone = {
        key: value
        for key, value in state.items()
        if not key.startswith(head_prefixes) and key not in start.reader.mapping.unused
    }
    heads = PretrainingHeads(start.config.width, start.config.vocab_size)
    prefix = f"{HEADS}."
    for module, weights_of, what in (
        (model, backbone, "its merged weights do not fit the model"),
        (
            heads,
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
            "its pre-training heads do not fit the model",
        ),
    ):
        try:
            module.load_state_dict(weights_of, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:300]
            raise CheckpointError(f"{start.reader.path}: {what} ({detail})") from None
    del state, backbone
    for module in (model, heads):
        module.requires_grad_(False).eval()
    vectors = []
    for group in start.plan.groups:
        if len(group.experts) > 1:
            inputs = group_inputs(group, start.reader, start.method, start.origin, None)
            origin = inputs.origin.float()
            experts = {modality: weight.float() - origin for modality, weight in inputs.experts.items()}
            vectors.append(TaskVectors(group.target, group.layer, origin, experts))
    return UnlabeledObjective(model, heads, weights, mask_id, kind), vectors


def learn(
    objective: UnlabeledObjective,
    vectors: list[TaskVectors],
    coefficients: Coefficients,
    batches: SplitBatches,
    config: AdaMergeConfig,
    resumed: LearningState | None,
    state_path: Path,
    identity: str,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> LearningState:
    """Adam on λ from `resumed` (or `init_lam`) to `config.steps`, the state written every
    `checkpoint_every` steps and at the last; step s reads batch s mod the batch count."""
    lam = torch.full(coefficients.shape, float(config.init_lam), requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=config.lr)
    step, losses = 0, []
    if resumed is not None:
        with torch.no_grad():
            lam.copy_(resumed.lam)
        optimizer.load_state_dict(resumed.optimizer)
        step, losses = resumed.step, list(resumed.losses)
    bar = tqdm(
        total=config.steps, initial=step, desc=f"adamerge ({config.objective})", disable=not progress, unit="step"
    )
    with bar:
        while step < config.steps:
            generator = step_generator(config.random_seed, step, "adamerge")
            loss = _run(objective, merged_tensors(vectors, lam, coefficients), batches[step % len(batches)], generator)
            if not math.isfinite(float(loss.detach())):
                raise ConfigError(
                    f"the {config.objective} objective is not finite at step {step + 1}; try a lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                lam.clamp_(0.0, 1.0)
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_state(state_path, identity, LearningState(step, lam, optimizer.state_dict(), losses))
            if on_step is not None:
                on_step(step, losses[-1])
    return LearningState(step, lam.detach(), optimizer.state_dict(), losses)
