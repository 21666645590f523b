"""The study as a graph of typed stages, planned from the recipe alone: nothing is read, run or written.

A stage is what one cached directory holds (a tokenizer, a pre-training run, a merge, a fine-tuning
run, ...). It is named by the hash of its kind, its settings and the names of the stages it reads,
so two comparisons that need the same model share one stage, and a stage's name says exactly what
produced it. Every trained stage runs once per random seed; a model is one run per seed, each
evaluated under every protocol. `plan_study` returns the stages in an order that runs every input
before its readers, and the models each comparison compares; the executor runs the stages, the
assembler reads them. The stage itself is `graph.py`'s, its constructors by kind `planner.py`'s; this
module chooses the models (the grid of comparisons) and the seeds each runs under.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vlmerge.models.config import ExpertPlacement
from vlmerge.study.graph import Stage, StageKind
from vlmerge.study.planner import StagePlanner
from vlmerge.study.recipe import MergeSpec, Protocol, StudyRecipe
from vlmerge.study.results import (
    AGNOSTIC_SCRATCH,
    CONTROL,
    NAIVE_MERGE,
    NAIVE_UNMERGED,
    SEED_MERGE,
    UNMERGED,
    Group,
    ModelKind,
)
from vlmerge.study.stages import GallerySettings, MergeabilitySettings


@dataclass(frozen=True)
class PlannedRun:
    """One model under one random seed: its checkpoint and every evaluation of it."""

    random_seed: int
    checkpoint: Stage
    evaluations: Mapping[Protocol, Mapping[str, Stage]]  # protocol -> task -> the stage that scores it
    mergeability: Stage | None  # for merges by the main method: distances of the experts it merged
    path: Stage | None = None  # for the seed + merge and naive merge models: objectives between their experts


@dataclass(frozen=True)
class PlannedModel:
    """A model the report compares, and the stages that produce and evaluate it under each seed."""

    id: str
    label: str
    kind: ModelKind
    groups: tuple[Group, ...]
    seed_fraction: float
    placement: ExpertPlacement
    merge: MergeSpec | None
    specific: str | None  # for a merge: the id of the modality-specific model it merged
    runs: tuple[PlannedRun, ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(run.random_seed for run in self.runs)


@dataclass(frozen=True)
class StudyPlan:
    recipe: StudyRecipe
    stages: tuple[Stage, ...]  # every input before its readers
    models: Mapping[str, PlannedModel]
    gallery: Stage | None

    def model(self, model_id: str) -> PlannedModel:
        return self.models[model_id]


MAIN_GROUPS = frozenset({Group.BASELINES, Group.CONTROL})  # compared under every random seed
DOSE_CONDITIONS = {"naive": 0.0, "seed": None}  # the dose-response's origins: random weights, the main seed run


def dose_ids(condition: str, steps: int) -> tuple[str, str]:
    """The ids of a dose-response point's unmerged parent and of its merge."""
    return f"dose-{condition}-{steps}-specific", f"dose-{condition}-{steps}-merge"


PATH_MODELS = (SEED_MERGE, NAIVE_MERGE)  # the path between the experts is scored for the main comparison


@dataclass
class _Model:
    """A model while the grid is built: its groups accumulate as comparisons reuse it."""

    label: str
    kind: ModelKind
    seed_fraction: float
    placement: ExpertPlacement
    checkpoint: Callable[[int], Stage]  # random seed -> the stage of its checkpoint
    merge: MergeSpec | None = None
    specific: Callable[[int], Stage] | None = None  # for merges: random seed -> the specific model merged
    groups: list[Group] = field(default_factory=list)
    has_heads: bool = True  # carries pre-training heads (zero-shot retrieval needs them)
    protocols: frozenset[str] | None = None  # evaluated under these only (default: every protocol)


class _Planner(StagePlanner):
    """The stages, and the models the study compares: each model's groups accumulate as comparisons reuse it."""

    def __init__(self, recipe: StudyRecipe) -> None:
        super().__init__(recipe)
        self.models: dict[str, _Model] = {}

    def add(self, model_id: str, group: Group, make: Callable[[], _Model]) -> None:
        """`make()` builds the model the first time an id is asked for; later comparisons reuse it."""
        if model_id not in self.models:
            self.models[model_id] = make()
        self.models[model_id].groups.append(group)

    def merged_model(self, fraction: float, placement: ExpertPlacement, spec: MergeSpec, label: str | None = None):
        def make() -> _Model:
            def specific(seed: int) -> Stage:
                return self.specific_model(fraction, placement, seed)

            def checkpoint(seed: int) -> Stage:
                return self.merged(specific(seed), spec, self.origin(fraction, seed), seed)

            return _Model(
                label or f"{spec.label}, seed {fraction:.0%}, experts {placement.value}",
                ModelKind.MERGED,
                fraction,
                placement,
                checkpoint,
                spec,
                specific,
            )

        return make

    def grid(self) -> None:
        recipe, main_fraction, main, every = (
            self.recipe,
            self.recipe.seed_fraction,
            self.recipe.main_merge,
            ExpertPlacement.ALL,
        )
        start = "from the pretrained ViT" if recipe.init == "pretrained" else "from scratch"
        seed_merge = self.merged_model(main_fraction, every, main, f"seed pre-training + merge ({main.label})")
        naive_merge = self.merged_model(0.0, every, main, f"naive merge ({main.label}, no seed)")
        self.add(
            AGNOSTIC_SCRATCH,
            Group.BASELINES,
            lambda: _Model(
                f"modality-agnostic {start}",
                ModelKind.AGNOSTIC,
                1.0,
                ExpertPlacement.NONE,
                lambda seed: self.pretrain(StageKind.SEED, seed, recipe.total_steps, None, self.initial_model(seed)),
            ),
        )
        self.add(
            UNMERGED,
            Group.BASELINES,
            lambda: _Model(
                "modality-specific (not merged)",
                ModelKind.MULTIWAY,
                main_fraction,
                every,
                lambda seed: self.specific_model(main_fraction, every, seed),
            ),
        )
        if "heldout" in recipe.protocols:
            # What naive merging loses is measured against its own unmerged parent, by the protocols that train
            # nothing after the merge.
            self.add(
                NAIVE_UNMERGED,
                Group.BASELINES,
                lambda: _Model(
                    "modality-specific, no seed (not merged)",
                    ModelKind.MULTIWAY,
                    0.0,
                    every,
                    lambda seed: self.specific_model(0.0, every, seed),
                    protocols=frozenset({"heldout", "zeroshot"}),  # cheap: no training after the merge
                ),
            )
        self.add(NAIVE_MERGE, Group.BASELINES, naive_merge)
        self.add(SEED_MERGE, Group.BASELINES, seed_merge)
        if recipe.control:
            what = "the imported ViT, no VL pre-training" if recipe.init == "pretrained" else "random weights"
            self.add(
                CONTROL,
                Group.CONTROL,
                lambda: _Model(
                    f"no pre-training ({what})",
                    ModelKind.CONTROL,
                    0.0,
                    ExpertPlacement.NONE,
                    self.untrained,
                    has_heads=recipe.init == "random",
                ),
            )
        for spec in [main, *recipe.merges]:
            model_id = SEED_MERGE if spec == main else f"merge-{spec.key}"
            self.add(model_id, Group.METHODS, self.merged_model(main_fraction, every, spec))
        for fraction in recipe.seed_fractions:
            model_id = (
                SEED_MERGE if fraction == main_fraction else NAIVE_MERGE if fraction == 0 else f"seed{fraction:g}-merge"
            )
            self.add(model_id, Group.SEED_LENGTH, self.merged_model(fraction, every, main))
        for placement in recipe.architectures:
            model_id = SEED_MERGE if placement is every else f"arch-{placement.value}-merge"
            self.add(model_id, Group.ARCHITECTURE, self.merged_model(main_fraction, placement, main))
        for steps in sorted(set(recipe.specific_steps)):
            for condition, fraction in DOSE_CONDITIONS.items():
                self.dose(condition, fraction if fraction is not None else main_fraction, steps)

    def dose(self, condition: str, fraction: float, steps: int) -> None:
        """A modality-specific stage of `steps` steps from the seed run of `fraction` (0: random weights)
        and its merge by the main merge, each scored on held-out pairs only."""
        every, main = ExpertPlacement.ALL, self.recipe.main_merge

        def specific(seed: int) -> Stage:
            return self.pretrain(StageKind.MULTIWAY, seed, steps, every, self.origin(fraction, seed))

        def merged(seed: int) -> Stage:
            return self.merged(specific(seed), main, self.origin(fraction, seed), seed)

        only = frozenset({"heldout"})
        what = "no seed" if fraction == 0 else f"seed {fraction:.0%}"
        parent, merge = dose_ids(condition, steps)
        self.add(
            parent,
            Group.DOSE,
            lambda: _Model(
                f"modality-specific, {what}, {steps} steps",
                ModelKind.MULTIWAY,
                fraction,
                every,
                specific,
                protocols=only,
            ),
        )
        self.add(
            merge,
            Group.DOSE,
            lambda: _Model(
                f"{main.label} of {steps} modality-specific steps, {what}",
                ModelKind.MERGED,
                fraction,
                every,
                merged,
                main,
                specific,
                protocols=only,
            ),
        )

    def seeds(self, model: _Model) -> list[int]:
        return self.recipe.random_seeds if MAIN_GROUPS & set(model.groups) else self.recipe.sweep_random_seeds

    def specific_ids(self) -> dict[str, str]:
        """Every merge by the main method -> the unmerged model it came from, which mergeability compares it
        with; those not already among the baselines join the grid (under the sweep seeds)."""
        recipe, found = self.recipe, {}
        for model_id, model in list(self.models.items()):
            if model.merge != recipe.main_merge or model.specific is None or Group.DOSE in model.groups:
                continue  # a dose-response merge is read against its own parent, of its own length
            if (model.seed_fraction, model.placement) == (recipe.seed_fraction, ExpertPlacement.ALL):
                found[model_id] = UNMERGED
                continue
            specific_id = f"specific-seed{model.seed_fraction:g}-{model.placement.value}"
            label = f"modality-specific, seed {model.seed_fraction:.0%}, experts {model.placement.value} (not merged)"
            self.models.setdefault(
                specific_id,
                _Model(
                    label,
                    ModelKind.MULTIWAY,
                    model.seed_fraction,
                    model.placement,
                    model.specific,
                    groups=[Group.MERGEABILITY],
                ),
            )
            found[model_id] = specific_id
        return found

    def planned(self, model_id: str, model: _Model, specific_id: str | None) -> PlannedModel:
        runs = []
        for seed in self.seeds(model):
            checkpoint = model.checkpoint(seed)
            distances = None
            if specific_id is not None:
                specific = model.specific(seed)
                distances = self.stage(
                    StageKind.MERGEABILITY, MergeabilitySettings(), {"specific": specific}, f"of {specific.name}"
                )
            evaluations = self.evaluations(checkpoint, seed, model.has_heads, model.protocols)
            path = None
            if model_id in PATH_MODELS and "heldout" in evaluations and self.recipe.heldout.path_ratios:
                path = self.path(model.specific(seed))
            runs.append(PlannedRun(seed, checkpoint, evaluations, distances, path))
        return PlannedModel(
            model_id,
            model.label,
            model.kind,
            tuple(model.groups),
            model.seed_fraction,
            model.placement,
            model.merge,
            specific_id,
            tuple(runs),
        )


def plan_study(recipe: StudyRecipe) -> StudyPlan:
    """Every stage the recipe's comparisons need, and the models they compare; nothing runs."""
    planner = _Planner(recipe)
    planner.grid()
    specifics = planner.specific_ids()
    models = {
        model_id: planner.planned(model_id, model, specifics.get(model_id))
        for model_id, model in planner.models.items()
    }
    gallery = None
    finetuned = models[SEED_MERGE].runs[0].evaluations.get("finetune", {})
    if "retrieval" in finetuned and recipe.gallery_size:
        settings = GallerySettings(data=recipe.data_for("retrieval"), size=recipe.gallery_size)
        gallery = planner.stage(
            StageKind.GALLERY,
            settings,
            {"model": finetuned["retrieval"]},
            "retrieval gallery of the seed + merge model",
        )
    return StudyPlan(recipe, tuple(planner.stages.values()), models, gallery)


BEFORE_FINETUNING = (
    StageKind.TOKENIZER,
    StageKind.PRETRAINED,
    StageKind.UNTRAINED,
    StageKind.SEED,
    StageKind.MULTIWAY,
    StageKind.GRAMS,
    StageKind.FISHER,
    StageKind.MERGE,
)


def describe_plan(plan: StudyPlan) -> str:
    """The models a plan compares and the stages behind them, and the local files it reads."""
    recipe, models = plan.recipe, plan.models
    lines = [
        f"study {recipe.name}: {len(models)} models x {len(recipe.tasks)} tasks ({', '.join(recipe.tasks)}), "
        f"{recipe.model.size} size, {recipe.data.image_size} px, pre-training on {', '.join(recipe.data.names)}; "
        f"random seeds {recipe.random_seeds} (sweeps: {recipe.sweep_random_seeds}); "
        f"protocols {', '.join(recipe.protocols)}"
    ]
    width = max(34, *(len(m.id) for m in models.values()))  # ids of merges with many options run long
    lines += [
        f"  {m.id:<{width}} {m.label}  [{', '.join(g.value for g in m.groups)}; {len(m.runs)} seeds]"
        for m in models.values()
    ]
    early = [stage for stage in plan.stages if stage.kind in BEFORE_FINETUNING]
    lines.append(f"stages before fine-tuning ({len(early)}):")
    lines += [f"  {stage.kind.value:<10} {stage.label}" for stage in early]
    finetunes = sum(stage.kind is StageKind.FINETUNE for stage in plan.stages)
    lines.append(
        f"then {finetunes} fine-tuning runs (fine-tuning {recipe.finetune.steps} steps, probes "
        f"{recipe.probe_spec.steps}) and their evaluations ({len(plan.stages)} stages in all)"
    )
    files = recipe.local_files()
    missing = {name: path for name, path in files.items() if not Path(path).exists()}
    if files:
        lines.append(f"local files ({len(files)}, {len(missing)} missing):")
        lines += [f"  {name:<44} {path}{'  [missing]' if name in missing else ''}" for name, path in files.items()]
    return "\n".join(lines)
