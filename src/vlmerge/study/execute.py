"""Runs a planned study's stages in order, each through the stage cache (its only caller).

One work function per stage kind turns the stage's settings and its inputs' output files into the
library call that produces it (a pre-training run, a merge, a fine-tuning run, ...) and returns the
small JSON result the assembler reads (metrics, warnings, parameter counts).
"""

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vlmerge.data.config import DataConfig
from vlmerge.data.sources import load_pairs
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging.engine import merge_checkpoint
from vlmerge.metrics.mergeability import mergeability
from vlmerge.models.checkpoint import load_model
from vlmerge.models.factory import count_parameters
from vlmerge.pretrained import save_pretrained_seed
from vlmerge.study.cache import StageCache, StageOutput
from vlmerge.study.gallery import retrieval_gallery
from vlmerge.study.plan import Stage, StageKind, StudyPlan
from vlmerge.tasks.finetune import RESULTS_FILE, evaluate_checkpoint, run_finetune
from vlmerge.training.config import FinetuneConfig, PretrainConfig, TokenizerConfig
from vlmerge.training.grams import collect_checkpoint_grams
from vlmerge.training.pretrain import run_pretraining, save_untrained
from vlmerge.training.setup import resolve_tokenizer

Inputs = Mapping[str, Path]  # role -> the output file of that input stage
Work = Callable[[Stage, Path, Inputs, bool], dict[str, Any]]


def _tokenizer(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    captions = load_pairs(DataConfig.parse(stage.settings["data"]), "train", progress).captions
    resolve_tokenizer(TokenizerConfig.parse(stage.settings["tokenizer"]), captions, None).save(directory / stage.output)
    return {}


def _pretrained(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    out = save_pretrained_seed(directory / stage.output, **stage.settings)
    return {"parameters": count_parameters(load_model(out))}


def _pretrain(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    settings = dict(stage.settings)
    if "init" in inputs:
        settings["init"] = str(inputs["init"])
    if "tokenizer" in inputs:
        settings["tokenizer"] = {**settings["tokenizer"], "path": str(inputs["tokenizer"])}
    out = run_pretraining(PretrainConfig.parse(settings, where=f"stage {stage.name}"), directory, progress)
    return {"parameters": count_parameters(load_model(out))}


def _grams(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    settings = stage.settings
    collect_checkpoint_grams(
        inputs["model"],
        directory / stage.output,
        DataConfig.parse(settings["data"]),
        settings["split"],
        settings["batch_size"],
        progress=progress,
    )
    return {}


def _merge(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    result = merge_checkpoint(
        inputs["source"],
        stage.settings["method"],
        stage.settings["options"],
        out=directory / stage.output,
        seed_checkpoint=inputs.get("seed_checkpoint"),
        grams=inputs.get("grams"),
    )
    return {"warnings": result.warnings, "parameters": count_parameters(load_model(result.path))}


def _untrained(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    settings = {**stage.settings, "tokenizer": {**stage.settings["tokenizer"], "path": str(inputs["tokenizer"])}}
    out = save_untrained(PretrainConfig.parse(settings, where=f"stage {stage.name}"), directory / stage.output)
    return {"parameters": count_parameters(load_model(out))}


def _finetune(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    config = FinetuneConfig.parse({**stage.settings, "init": str(inputs["model"])}, where=f"stage {stage.name}")
    run_finetune(config, directory, progress)
    results = json.loads((directory / RESULTS_FILE).read_text())
    return {"metrics": results["metrics"], "samples": results["samples"]}


def _zero_shot(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    data = DataConfig.parse(stage.settings["data"])
    return evaluate_checkpoint(inputs["model"], "retrieval", "test", data).as_dict()


def _mergeability(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    report = mergeability(open_checkpoint(inputs["specific"]))
    return {"model": report.model, "layers": {str(layer): values for layer, values in report.per_layer.items()}}


def _gallery(stage: Stage, directory: Path, inputs: Inputs, progress: bool) -> dict[str, Any]:
    data = DataConfig.parse(stage.settings["data"])
    return {"entries": retrieval_gallery(inputs["model"], data, stage.settings["size"], directory)}


WORK: dict[StageKind, Work] = {
    StageKind.TOKENIZER: _tokenizer,
    StageKind.PRETRAINED: _pretrained,
    StageKind.UNTRAINED: _untrained,
    StageKind.SEED: _pretrain,
    StageKind.SPECIFIC: _pretrain,
    StageKind.GRAMS: _grams,
    StageKind.MERGE: _merge,
    StageKind.FINETUNE: _finetune,
    StageKind.ZERO_SHOT: _zero_shot,
    StageKind.MERGEABILITY: _mergeability,
    StageKind.GALLERY: _gallery,
}


def execute(plan: StudyPlan, study_dir: str | os.PathLike, progress: bool = True) -> dict[str, StageOutput]:
    """Run (or take from the cache) every stage of the plan, in order; outputs by stage key."""
    cache = StageCache(Path(study_dir) / "cache", progress)
    outputs: dict[str, StageOutput] = {}
    for stage in plan.stages:
        inputs = {role: outputs[s.key].directory / s.output for role, s in stage.inputs.items()}
        outputs[stage.key] = cache.run(
            stage, lambda directory, s=stage, i=inputs: WORK[s.kind](s, directory, i, progress)
        )
    return outputs
