"""What a study produces, as frozen dataclasses with one JSON schema (results.json).

The assembler builds these, the claims and the report read their attributes, and the `to_json` /
`from_json` pairs here are the only code that knows the file's keys. Models are identified by id;
the ids of the models every comparison needs are named here once. Every score is a mean over random
seeds with its 95 % interval (`stats.Estimate`), every comparison a paired difference.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vlmerge.core.errors import ConfigError
from vlmerge.study.decisions import Verdict
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.stats import Correlation, Estimate

Metrics = Mapping[str, float]
MEAN = "mean"  # the task name of a score averaged over the tasks of a protocol


class ModelKind(str, Enum):
    AGNOSTIC = "agnostic"  # pre-trained as one modality-agnostic model
    MULTIWAY = "specific"  # modality-specific (multiway), not merged
    MERGED = "merged"
    CONTROL = "control"  # never pre-trained on image-text pairs


class Group(str, Enum):
    """Which comparison of the report a model belongs to (a model may serve several)."""

    BASELINES = "baselines"
    CONTROL = "control"
    METHODS = "methods"
    SEED_LENGTH = "seed_length"
    ARCHITECTURE = "architecture"
    MERGEABILITY = "mergeability"  # unmerged models the merges are compared with
    DOSE = "dose"  # modality-specific stages of several lengths, and their merges


# The models the paper's comparisons are about.
AGNOSTIC_SCRATCH = "agnostic-scratch"
UNMERGED = "specific"
NAIVE_MERGE = "naive-merge"
NAIVE_UNMERGED = "specific-seed0-all"  # naive merging's own unmerged parent (the mergeability sweep's id too)
SEED_MERGE = "seed-merge"
CONTROL = "no-pretraining"


def _seeds_to_json(values: Mapping[int, Any]) -> dict[str, Any]:
    return {str(seed): value for seed, value in values.items()}


def _seeds_from_json(values: Mapping[str, Any]) -> dict[int, Any]:
    return {int(seed): value for seed, value in values.items()}


@dataclass(frozen=True)
class TaskScore:
    """One model's primary metric on one task (or the mean over tasks) under one protocol."""

    metric: str
    per_seed: Mapping[int, float]  # random seed -> value
    estimate: Estimate  # their mean with its interval
    metrics: Metrics = field(default_factory=dict)  # every metric of the task, mean over seeds

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "per_seed": _seeds_to_json(self.per_seed),
            "estimate": self.estimate.to_json(),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TaskScore":
        return cls(
            data["metric"],
            _seeds_from_json(data["per_seed"]),
            Estimate.from_json(data["estimate"]),
            dict(data["metrics"]),
        )


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
    checkpoints: Mapping[int, str]  # random seed -> checkpoint, relative to the study directory
    parameters: int
    scores: Mapping[str, Mapping[str, TaskScore]]  # protocol -> task (or MEAN) -> score
    merge_label: str | None = None  # the merge entry's label: method, options, learnt coefficients

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.checkpoints)

    def score(self, protocol: str, task: str = MEAN) -> TaskScore | None:
        return self.scores.get(protocol, {}).get(task)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind.value,
            "groups": [g.value for g in self.groups],
            "seed_fraction": self.seed_fraction,
            "placement": self.placement,
            "method": self.method,
            "options": dict(self.options),
            "checkpoints": _seeds_to_json(self.checkpoints),
            "parameters": self.parameters,
            "scores": {p: {t: s.to_json() for t, s in tasks.items()} for p, tasks in self.scores.items()},
            "merge_label": self.merge_label,
        }

    @classmethod
    def from_json(cls, model_id: str, data: Mapping[str, Any]) -> "ModelResult":
        scores = {p: {t: TaskScore.from_json(s) for t, s in tasks.items()} for p, tasks in data["scores"].items()}
        return cls(
            model_id,
            data["label"],
            ModelKind(data["kind"]),
            tuple(map(Group, data["groups"])),
            data["seed_fraction"],
            data["placement"],
            data["method"],
            dict(data["options"]),
            _seeds_from_json(data["checkpoints"]),
            data["parameters"],
            scores,
            data.get("merge_label"),
        )


@dataclass(frozen=True)
class Decision:
    """How a paired difference was decided: its tests, and what the run could have detected."""

    p: float  # exact sign-flip over seeds (parity: one-sided, against -margin)
    adjusted_p: float  # Holm over the family of comparisons it was decided with
    family: int  # how many comparisons that family holds
    tost_p: float | None  # equivalence within ±margin (None: not tested)
    margin: float | None
    detectable: float  # the smallest difference detectable at 80 % power
    target: float  # the difference the seed count below is for (the paper's, else the margin)
    seeds_needed: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Decision":
        return cls(**data)


@dataclass(frozen=True)
class Comparison:
    """A paired difference on one task (or the mean over tasks) under one protocol: a − b, oriented so
    that positive favours a (a loss enters with its sign turned), or the contrast `label` names."""

    a: str
    b: str
    protocol: str
    task: str
    per_seed: Mapping[int, float]  # random seed -> the difference under that seed
    difference: Estimate
    verdict: Verdict
    paper: str | None = None  # the paper's figure for the nearest task, in words
    note: str = ""
    label: str = ""  # what the difference is, where it is not a's score minus b's
    test: Decision | None = None
    headline: bool = False  # one of the comparisons the claim's verdict is decided on

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "protocol": self.protocol,
            "task": self.task,
            "per_seed": _seeds_to_json(self.per_seed),
            "difference": self.difference.to_json(),
            "verdict": self.verdict.value,
            "paper": self.paper,
            "note": self.note,
            "label": self.label,
            "test": self.test.to_json() if self.test else None,
            "headline": self.headline,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Comparison":
        return cls(
            data["a"],
            data["b"],
            data["protocol"],
            data["task"],
            _seeds_from_json(data["per_seed"]),
            Estimate.from_json(data["difference"]),
            Verdict(data["verdict"]),
            data["paper"],
            data["note"],
            data.get("label", ""),
            Decision.from_json(data["test"]) if data.get("test") else None,
            data.get("headline", False),
        )


@dataclass(frozen=True)
class Trend:
    """A rank correlation a claim reads (score vs seed share, distance vs what merging keeps)."""

    name: str  # e.g. "l2 (model)" or "seed fraction"
    protocol: str
    correlation: Correlation
    verdict: Verdict
    p: float | None = None  # Spearman's test of rho = 0
    adjusted_p: float | None = None  # Holm over the claim's trends that decide it

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "correlation": self.correlation.to_json(),
            "verdict": self.verdict.value,
            "p": self.p,
            "adjusted_p": self.adjusted_p,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Trend":
        return cls(
            data["name"],
            data["protocol"],
            Correlation.from_json(data["correlation"]),
            Verdict(data["verdict"]),
            data.get("p"),
            data.get("adjusted_p"),
        )


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str  # the paper's claim, in words
    verdict: Verdict  # under the paper's protocol, on the mean over tasks (or the claim's own trend)
    summary: str  # one paragraph that reads the intervals
    comparisons: tuple[Comparison, ...] = ()
    trends: tuple[Trend, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "paper": self.paper,
            "verdict": self.verdict.value,
            "summary": self.summary,
            "comparisons": [c.to_json() for c in self.comparisons],
            "trends": [t.to_json() for t in self.trends],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Claim":
        return cls(
            data["id"],
            data["paper"],
            Verdict(data["verdict"]),
            data["summary"],
            tuple(map(Comparison.from_json, data["comparisons"])),
            tuple(map(Trend.from_json, data["trends"])),
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
class MetricName:
    """A distance between experts: its family (l2, cosine, ...) over the whole model, or averaged over a
    range of layers. results.json names it by `label`."""

    family: str
    layers: tuple[int, int] | None = None  # first and last layer averaged; None: the whole model

    @property
    def label(self) -> str:
        return self.family if self.layers is None else f"{self.family} (layers {self.layers[0]}-{self.layers[1]})"

    @classmethod
    def from_label(cls, label: str) -> "MetricName":
        """The inverse of `label`: only results.json's keys are read this way."""
        match = re.fullmatch(r"(.+) \(layers (\d+)-(\d+)\)", label)
        return cls(label) if match is None else cls(match[1], (int(match[2]), int(match[3])))


def _metrics_to_json(values: Mapping[MetricName, Any]) -> dict[str, Any]:
    return {metric.label: value for metric, value in values.items()}


def _metrics_from_json(values: Mapping[str, Any]) -> dict[MetricName, Any]:
    return {MetricName.from_label(label): value for label, value in values.items()}


@dataclass(frozen=True)
class MergeabilityPoint:
    """A modality-specific model under one seed: its expert distances, and what its merge kept of its scores."""

    specific: str  # the unmerged model's id
    merged: str  # the merged model's id
    random_seed: int
    seed_fraction: float
    placement: str
    metrics: Mapping[MetricName, float]  # distance between the experts -> value
    retention: Mapping[str, float]  # protocol -> merged score minus specific score (mean over tasks)

    def to_json(self) -> dict[str, Any]:
        return {
            "specific": self.specific,
            "merged": self.merged,
            "random_seed": self.random_seed,
            "seed_fraction": self.seed_fraction,
            "placement": self.placement,
            "metrics": _metrics_to_json(self.metrics),
            "retention": dict(self.retention),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MergeabilityPoint":
        return cls(
            data["specific"],
            data["merged"],
            data["random_seed"],
            data["seed_fraction"],
            data["placement"],
            _metrics_from_json(data["metrics"]),
            dict(data["retention"]),
        )


@dataclass(frozen=True)
class Mergeability:
    points: tuple[MergeabilityPoint, ...] = ()
    correlations: Mapping[str, Mapping[MetricName, Correlation]] = field(default_factory=dict)  # protocol -> rho

    def to_json(self) -> dict[str, Any]:
        return {
            "points": [p.to_json() for p in self.points],
            "correlations": {
                p: _metrics_to_json({m: c.to_json() for m, c in by_metric.items()})
                for p, by_metric in self.correlations.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Mergeability":
        correlations = {
            p: {m: Correlation.from_json(c) for m, c in _metrics_from_json(by_metric).items()}
            for p, by_metric in data["correlations"].items()
        }
        return cls(tuple(map(MergeabilityPoint.from_json, data["points"])), correlations)


@dataclass(frozen=True)
class DoseResponse:
    """What merging loses on held-out pairs (merged minus unmerged loss) against the length of the
    modality-specific stage, for experts from random weights (naive) or from the seed run."""

    condition: str  # "naive" or "seed"
    steps: tuple[int, ...]
    costs: tuple[Estimate, ...]  # per length, over seeds and held-out pairs
    correlation: Correlation  # Spearman's rho of length with cost over (length, seed) points

    def to_json(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "steps": list(self.steps),
            "costs": [c.to_json() for c in self.costs],
            "correlation": self.correlation.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DoseResponse":
        return cls(
            data["condition"],
            tuple(data["steps"]),
            tuple(map(Estimate.from_json, data["costs"])),
            Correlation.from_json(data["correlation"]),
        )


@dataclass(frozen=True)
class PathPoint:
    """A point of the interpolation path between a model's experts: its held-out loss at one ratio."""

    model: str  # the merged model whose experts the path joins (seed + merge, naive merge)
    ratio: float  # the vision expert's weight
    loss: Estimate

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "ratio": self.ratio, "loss": self.loss.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PathPoint":
        return cls(data["model"], data["ratio"], Estimate.from_json(data["loss"]))


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
        hits = tuple(GalleryHit(h["caption"], h["score"], h["correct"]) for h in data["top"])
        return cls(data["image"], data["caption"], hits)


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
    recipe: StudyRecipe  # the validated recipe
    tasks: tuple[str, ...]
    primary_metrics: Mapping[str, str]  # task -> the metric its score uses
    protocols: tuple[str, ...]
    models: Mapping[str, ModelResult]  # by id, in the order the study planned them
    control: tuple[Comparison, ...] = ()  # pre-training gain: from scratch minus no pre-training
    sweeps: Sweeps = Sweeps()
    mergeability: Mergeability = Mergeability()
    gallery: tuple[GalleryEntry, ...] = ()
    timing: Timing | None = None
    claims: tuple[Claim, ...] = ()
    path: tuple[PathPoint, ...] = ()
    dose: tuple[DoseResponse, ...] = ()
    methods: tuple[Comparison, ...] = ()  # each merge method minus the main merge

    def model(self, model_id: str) -> ModelResult:
        if model_id not in self.models:
            raise ConfigError(f"the study has no model {model_id!r}; it has {list(self.models)}")
        return self.models[model_id]

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
            "recipe": self.recipe.model_dump(mode="json"),
            "tasks": list(self.tasks),
            "primary_metrics": dict(self.primary_metrics),
            "protocols": list(self.protocols),
            "models": {model_id: model.to_json() for model_id, model in self.models.items()},
            "control": [c.to_json() for c in self.control],
            "sweeps": self.sweeps.to_json(),
            "mergeability": self.mergeability.to_json(),
            "gallery": [entry.to_json() for entry in self.gallery],
            "timing": timing,
            "claims": [claim.to_json() for claim in self.claims],
            "path": [point.to_json() for point in self.path],
            "dose": [d.to_json() for d in self.dose],
            "methods": [c.to_json() for c in self.methods],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StudyResults":
        try:
            timing = data["timing"] and Timing(**data["timing"])
            return cls(
                data["name"],
                StudyRecipe.parse(data["recipe"], where="the results' recipe"),
                tuple(data["tasks"]),
                data["primary_metrics"],
                tuple(data["protocols"]),
                {model_id: ModelResult.from_json(model_id, model) for model_id, model in data["models"].items()},
                tuple(map(Comparison.from_json, data["control"])),
                Sweeps.from_json(data["sweeps"]),
                Mergeability.from_json(data["mergeability"]),
                tuple(map(GalleryEntry.from_json, data["gallery"])),
                timing,
                tuple(map(Claim.from_json, data["claims"])),
                tuple(map(PathPoint.from_json, data.get("path", ()))),
                tuple(map(DoseResponse.from_json, data.get("dose", ()))),
                tuple(map(Comparison.from_json, data.get("methods", ()))),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"not a study results file: {type(error).__name__} {error}") from None
