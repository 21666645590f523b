"""Stages 1 and 2 of the recipe: seed pre-training (modality-agnostic) and modality-specific
pre-training with every expert initialised from the seed's shared weights.

Without a seed checkpoint the modality-specific run starts its experts from one shared random
init: the paper's naive merging baseline (a seed of length zero). Seed pre-training starts from
scratch or continues a modality-agnostic checkpoint, such as a pretrained image transformer
(`vlmerge import-vit`); a specific run started from that same checkpoint is the paper's naive
merging on pretrained weights.
"""

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.sources import CaptionPairs, load_pairs
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.checkpoint import file_sha256, open_checkpoint
from vlmerge.merging.plan import expand_to_experts
from vlmerge.models.checkpoint import load_head_state, load_model, save_model
from vlmerge.models.config import ModelConfig
from vlmerge.models.factory import model_config
from vlmerge.models.heads import PretrainingHeads
from vlmerge.models.transformer import VLTransformer
from vlmerge.training.config import PretrainConfig
from vlmerge.training.distributed import DistributedContext, init_distributed
from vlmerge.training.objectives import PretrainingObjective
from vlmerge.training.run_directory import RunDirectory, open_run_dir, update_manifest
from vlmerge.training.setup import PairData, make_optimizer, resolve_tokenizer
from vlmerge.training.trainer import Trainer, batch_indices, step_generator

MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
HEADS = "heads"


def build_pretraining_model(
    config: PretrainConfig, vocab_size: int, max_text_len: int
) -> tuple[VLTransformer, PretrainingHeads]:
    """The stage's model and heads at step 0 (seeded): scratch, or experts copied from a shared model."""
    torch.manual_seed(config.random_seed)
    shape = model_config(
        config.model.size,
        image_size=config.data.image_size,
        vocab_size=vocab_size,
        max_text_len=max_text_len,
        **config.model.overrides(),
    )
    shape = shape.with_placement(config.placement)
    if config.stage == "seed":
        if config.init:
            return _load_agnostic(config.init, shape)
        return VLTransformer(shape), PretrainingHeads(shape.width, vocab_size)
    if config.init is None:
        shared, heads = VLTransformer(shape.agnostic()), PretrainingHeads(shape.width, vocab_size)
    else:
        shared, heads = _load_agnostic(config.init, shape)
    model = VLTransformer(shape)
    model.load_state_dict(expand_to_experts(shared.state_dict(), model.state_dict()), strict=True)
    return model, heads


def _load_agnostic(path: str, shape: ModelConfig) -> tuple[VLTransformer, PretrainingHeads]:
    """A modality-agnostic checkpoint and its pre-training heads (fresh, seeded, if it has none)."""
    seed = load_model(path)
    if seed.config.is_multiway:
        raise ConfigError(
            f"{path}: the init checkpoint has experts ({seed.config.placement.value}); "
            "pre-training starts from a modality-agnostic checkpoint"
        )
    if seed.config != shape.agnostic():
        changed = sorted(k for k, v in shape.agnostic() if getattr(seed.config, k) != v)
        raise ConfigError(f"{path}: the init model differs from this stage's model in {changed}")
    heads = PretrainingHeads(shape.width, shape.vocab_size)
    state = load_head_state(path, HEADS)
    if state is not None:
        heads.load_state_dict(state, strict=True)
    return seed, heads


def run_tokenizer(run: RunDirectory, config: PretrainConfig, train: CaptionPairs) -> tuple[TextTokenizer, bool]:
    """The run's tokenizer, fixed once in the run directory (a resumed run and every rank read the same
    file instead of training it again), and whether it is new: read from the directory, checked against
    the manifest, or resolved now (saved by `keep_tokenizer` once the directory is claimed)."""
    path = run.path / TOKENIZER_FILE
    recorded = run.manifest.tokenizer_sha256 if run.manifest is not None else None
    if path.is_file():
        data = path.read_bytes()
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            raise ConfigError(
                f"{path} is not the tokenizer this run was trained with (its SHA-256 differs from "
                f"{run.recorded_in}); restore it or use a new run directory"
            )
        try:
            return TextTokenizer.from_json(data.decode(), config.tokenizer.max_len), False
        except (UnicodeDecodeError, ConfigError) as error:
            raise ConfigError(f"{path}: {error}") from None
    if recorded is not None or run.has_checkpoint:
        raise ConfigError(
            f"{path} is missing, but this run was trained with it: a new vocabulary would not fit the "
            "checkpoint's embeddings; restore it or use a new run directory"
        )
    init = open_checkpoint(config.init) if config.init else None
    return resolve_tokenizer(config.tokenizer, train.captions, init), True


def keep_tokenizer(run: RunDirectory, tokenizer: TextTokenizer, new: bool) -> None:
    """Save a new tokenizer into the claimed run directory, and record its hash in the manifest."""
    path = run.path / TOKENIZER_FILE
    if new:
        tokenizer.save(path)
    if new or run.manifest.tokenizer_sha256 is None:  # or a run from before manifests: its file as it is
        update_manifest(run.path, tokenizer_sha256=file_sha256(path))


def run_pretraining(
    config: PretrainConfig, run_dir: str | os.PathLike, progress: bool = True, dist: DistributedContext | None = None
) -> Path:
    """Train (or resume) the stage in `run_dir`; return the path of its final checkpoint. The main process
    locks the run directory for the whole run, and claims it only once the data, tokenizer, model and
    batch size are known to work: a config error leaves the directory free for the corrected config."""
    dist = dist or init_distributed()
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as held:
        with dist.together():  # the main process's checks end every process when they fail
            run = held.enter_context(open_run_dir(run_dir, config)) if dist.is_main else None
            train = load_pairs(config.data, "train", progress=progress and dist.is_main)
            if len(train) < config.optimizer.batch_size:
                raise ConfigError(f"batch_size {config.optimizer.batch_size} exceeds the {len(train)} training pairs")
            if run is not None:
                tokenizer, new = run_tokenizer(run, config, train)
                model, heads = build_pretraining_model(config, tokenizer.vocab_size, tokenizer.max_len)  # checks init
                run.claim()
                keep_tokenizer(run, tokenizer, new)
        tokenizer = TextTokenizer.load(run_dir / TOKENIZER_FILE, config.tokenizer.max_len)  # what every rank reads
        if run is None:
            model, heads = build_pretraining_model(config, tokenizer.vocab_size, tokenizer.max_len)
        return _pretrain(config, run_dir, PairData.of(train, tokenizer), tokenizer, model, heads, progress, dist)


def _pretrain(
    config: PretrainConfig,
    run_dir: Path,
    pairs: PairData,
    tokenizer: TextTokenizer,
    model: VLTransformer,
    heads: PretrainingHeads,
    progress: bool,
    dist: DistributedContext,
) -> Path:
    model, heads = model.to(dist.device), heads.to(dist.device)
    objective = dist.wrap(PretrainingObjective(model, heads, config.objectives, tokenizer.mask_id, dist))
    optimizer, scheduler = make_optimizer([model, heads], config.optimizer, config.steps)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        rows = batch_indices(len(pairs), config.optimizer.batch_size, step, config.random_seed)
        return objective(pairs[rows].to(dist.device), step_generator(config.random_seed, step, device=dist.device))

    trainer = Trainer(
        run_dir,
        {"model": model, "heads": heads},
        optimizer,
        config.steps,
        config.checkpoint_every,
        scheduler,
        progress=progress,
        grad_clip=config.optimizer.grad_clip,
        dist=dist,
    )
    trainer.fit(step_fn)
    out = run_dir / MODEL_FILE
    with dist.together():  # a write that fails on the main process ends the others too
        if dist.is_main:
            metadata = {
                "stage": config.stage,
                "tokenizer": tokenizer.to_json(),
                "run_config": json.dumps(config.model_dump(mode="json"), sort_keys=True),
            }
            save_model(model, out, step=config.steps, extra_metadata=metadata, heads={HEADS: heads})
    return out


def save_untrained(config: PretrainConfig, out: str | os.PathLike) -> Path:
    """The seed stage's model and heads at step 0, saved as a checkpoint: the no-pre-training control
    (the same architecture, initialisation and tokenizer as the seed run of this config, never trained)."""
    if config.stage != "seed" or config.init is not None or config.tokenizer.path is None:
        raise ConfigError(
            "an untrained model is the seed stage's step 0: a seed config without init, with tokenizer.path"
        )
    tokenizer = TextTokenizer.load(config.tokenizer.path, config.tokenizer.max_len)
    model, heads = build_pretraining_model(config, tokenizer.vocab_size, tokenizer.max_len)
    metadata = {
        "stage": "untrained",
        "tokenizer": tokenizer.to_json(),
        "run_config": json.dumps(config.model_dump(mode="json"), sort_keys=True),
    }
    return save_model(model, out, step=0, extra_metadata=metadata, heads={HEADS: heads})
