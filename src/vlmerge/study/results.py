"""What a study produces, as frozen dataclasses with one JSON schema (results.json).

The runner builds these, the claims and the report read their attributes, and `StudyResults.to_json` /
`from_json` are the only code that knows the file's keys. Models are identified by id; the ids of the
models every comparison needs are named here once.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vlmerge.core.errors import ConfigError

Metrics = Mapping[str, float]


class ModelKind(str, Enum):
    AGNOSTIC = "agnostic"  # pre-trained as one modality-agnostic model
    SPECIFIC = "specific"  # modality-specific, not merged
    MERGED = "merged"


class Group(str, Enum):
    """Which comparison of the report a model belongs to (a model may serve several)."""

    BASELINES = "baselines"
    METHODS = "methods"
    SEED_LENGTH = "seed_length"
    ARCHITECTURE = "architecture"


# The models the paper's comparisons are about.
AGNOSTIC_SCRATCH = "agnostic-scratch"
SPECIFIC = "specific"
NAIVE_MERGE = "naive-merge"
SEED_MERGE = "seed-merge"


@dataclass(frozen=True)
class ModelResult:
    id: str
    label: str
    kind: ModelKind
    groups: tuple[Group, ...]
    seed_fraction: float
    placement: str
    method: str | None
    options: Mapping[str, Any]
    checkpoint: str  # relative to the study directory
    parameters: int
    zero_shot: Metrics | None
    tasks: Mapping[str, Metrics]  # task -> its metrics after fine-tuning
    score: float  # mean primary metric over the tasks

    def primary(self, task: str, metric: str) -> float | None:
        return self.tasks.get(task, {}).get(metric)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind.value,
            "groups": [g.value for g in self.groups],
            "seed_fraction": self.seed_fraction,
            "placement": self.placement,
            "method": self.method,
            "options": dict(self.options),
            "checkpoint": self.checkpoint,
            "parameters": self.parameters,
            "zero_shot": None if self.zero_shot is None else dict(self.zero_shot),
            "tasks": {task: dict(metrics) for task, metrics in self.tasks.items()},
            "score": self.score,
        }

    @classmethod
    def from_json(cls, model_id: str, data: Mapping[str, Any]) -> "ModelResult":
        return cls(
            model_id,
            data["label"],
            ModelKind(data["kind"]),
            tuple(map(Group, data["groups"])),
            data["seed_fraction"],
            data["placement"],
            data["method"],
            dict(data["options"]),
            data["checkpoint"],
            data["parameters"],
            data["zero_shot"],
            data["tasks"],
            data["score"],
        )


@dataclass(frozen=True)
class SweepPoint:
    x: float | str
    model: str


@dataclass(frozen=True)
class Sweeps:
    """One factor varied from the main setting; each point names the model it produced."""

    seed_fraction: tuple[SweepPoint, ...] = ()
    architecture: tuple[SweepPoint, ...] = ()
    interpolation_ratio: tuple[SweepPoint, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {name: [{"x": p.x, "model": p.model} for p in getattr(self, name)] for name in SWEEP_NAMES}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Sweeps":
        return cls(**{name: tuple(SweepPoint(p["x"], p["model"]) for p in data.get(name, ())) for name in SWEEP_NAMES})


SWEEP_NAMES = ("seed_fraction", "architecture", "interpolation_ratio")


@dataclass(frozen=True)
class MergeabilityPoint:
    """A modality-specific model's expert distances, and the score of its merge."""

    specific: str  # the specific model's stage
    merged: str  # the merged model's id
    seed_fraction: float
    placement: str
    metrics: Metrics
    score: float


@dataclass(frozen=True)
class Mergeability:
    points: tuple[MergeabilityPoint, ...] = ()
    spearman: Mapping[str, float | None] = field(default_factory=dict)  # metric -> rho with the merged score

    def to_json(self) -> dict[str, Any]:
        return {
            "points": [
                {
                    "specific": p.specific,
                    "merged": p.merged,
                    "seed_fraction": p.seed_fraction,
                    "placement": p.placement,
                    "metrics": dict(p.metrics),
                    "score": p.score,
                }
                for p in self.points
            ],
            "spearman": dict(self.spearman),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Mergeability":
        points = tuple(
            MergeabilityPoint(p["specific"], p["merged"], p["seed_fraction"], p["placement"], p["metrics"], p["score"])
            for p in data["points"]
        )
        return cls(points, dict(data["spearman"]))


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str  # the paper's claim, in words
    compare: tuple[str, ...]  # ids of the models it reads
    holds: bool | None  # None: this run cannot decide
    finding: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "paper": self.paper,
            "compare": list(self.compare),
            "holds": self.holds,
            "finding": self.finding,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Claim":
        return cls(data["id"], data["paper"], tuple(data["compare"]), data["holds"], data["finding"])


@dataclass(frozen=True)
class GalleryHit:
    caption: str
    score: float
    correct: bool


@dataclass(frozen=True)
class GalleryEntry:
    image: str  # relative to the study directory
    caption: str  # the query image's own caption
    top: tuple[GalleryHit, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "caption": self.caption,
            "top": [{"caption": h.caption, "score": h.score, "correct": h.correct} for h in self.top],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GalleryEntry":
        return cls(
            data["image"],
            data["caption"],
            tuple(GalleryHit(h["caption"], h["score"], h["correct"]) for h in data["top"]),
        )


@dataclass(frozen=True)
class Timing:
    seconds: float  # wall time of this invocation
    stages_run: int
    stages_cached: int
    stage_seconds: float  # what every stage took when it ran, cached ones included

    @property
    def stages(self) -> int:
        return self.stages_run + self.stages_cached


@dataclass(frozen=True)
class StudyResults:
    name: str
    recipe: Mapping[str, Any]  # the validated recipe, as JSON
    tasks: tuple[str, ...]
    primary_metrics: Mapping[str, str]  # task -> the metric its score uses
    models: Mapping[str, ModelResult]  # by id, in the order the study planned them
    sweeps: Sweeps = Sweeps()
    mergeability: Mergeability = Mergeability()
    gallery: tuple[GalleryEntry, ...] = ()
    timing: Timing | None = None
    claims: tuple[Claim, ...] = ()

    def model(self, model_id: str) -> ModelResult:
        if model_id not in self.models:
            raise ConfigError(f"the study has no model {model_id!r}; it has {list(self.models)}")
        return self.models[model_id]

    def score(self, model_id: str) -> float:
        return self.model(model_id).score

    def in_group(self, group: Group) -> list[ModelResult]:
        return [m for m in self.models.values() if group in m.groups]

    def to_json(self) -> dict[str, Any]:
        timing = (
            None
            if self.timing is None
            else {
                "seconds": self.timing.seconds,
                "stages_run": self.timing.stages_run,
                "stages_cached": self.timing.stages_cached,
                "stage_seconds": self.timing.stage_seconds,
            }
        )
        return {
            "name": self.name,
            "recipe": dict(self.recipe),
            "tasks": list(self.tasks),
            "primary_metrics": dict(self.primary_metrics),
            "models": {model_id: model.to_json() for model_id, model in self.models.items()},
            "sweeps": self.sweeps.to_json(),
            "mergeability": self.mergeability.to_json(),
            "gallery": [entry.to_json() for entry in self.gallery],
            "timing": timing,
            "claims": [claim.to_json() for claim in self.claims],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StudyResults":
        try:
            timing = data["timing"] and Timing(**data["timing"])
            return cls(
                data["name"],
                data["recipe"],
                tuple(data["tasks"]),
                data["primary_metrics"],
                {model_id: ModelResult.from_json(model_id, model) for model_id, model in data["models"].items()},
                Sweeps.from_json(data["sweeps"]),
                Mergeability.from_json(data["mergeability"]),
                tuple(map(GalleryEntry.from_json, data["gallery"])),
                timing,
                tuple(map(Claim.from_json, data["claims"])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"not a study results file: {type(error).__name__} {error}") from None
