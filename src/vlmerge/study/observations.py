"""What the stages measured, per model, protocol, task and random seed, and the intervals over them.

The per-example values behind every score (`samples`) stay here, in memory: results.json keeps the
per-seed scores and their intervals, not every test example. Scores and paired differences are
estimated through `stats.estimate`, over seeds and test examples. The heldout protocol's one
evaluation is split here into one task per objective (`loss`, `itc`, ...); the path between a model's
experts is kept under one protocol per ratio, `path@0.25`, with the same tasks.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from vlmerge.core.errors import ConfigError
from vlmerge.study.cache import StageOutput
from vlmerge.study.plan import StudyPlan
from vlmerge.study.results import MEAN, TaskScore
from vlmerge.study.stages import EvaluationOutput, PathOutput
from vlmerge.study.stats import Estimate, Part, Statistic, estimate
from vlmerge.tasks import TASKS
from vlmerge.tasks.base import sample_mean
from vlmerge.tasks.heldout import SAMPLES as HELDOUT_TASKS

HELDOUT = "heldout"
HELDOUT_HEADLINE = "loss"  # the recipe's weighted sum of the held-out objectives (lower is better)
Terms = Mapping[tuple[str, str], float]  # (model id, protocol) -> weight of its values in a contrast


def path_protocol(ratio: float | str) -> str:
    """The protocol name the path's point at `ratio` is kept under, e.g. 'path@0.25'."""
    return f"path@{float(ratio):g}"


def _heldout_statistic(name: str, samples: Mapping[str, np.ndarray], axis: int = -1) -> float | np.ndarray:
    return sample_mean(samples[name], axis)


@dataclass(frozen=True)
class Observation:
    """One evaluation: a model under one seed, one protocol, one task."""

    metrics: Mapping[str, float]
    samples: Mapping[str, np.ndarray]
    value: float  # the task's primary metric


class Observations:
    def __init__(self, plan: StudyPlan, outputs: Mapping[str, StageOutput]) -> None:
        self.tasks: dict[str, list[str]] = {protocol: [] for protocol in plan.recipe.protocols}
        self.primary = {task: TASKS.get(task).primary_metric for task in plan.recipe.tasks}
        self.primary.setdefault("retrieval", TASKS.get("retrieval").primary_metric)  # zero-shot reads it
        self.by_key: dict[tuple[str, str, str, int], Observation] = {}
        for model in plan.models.values():
            for run in model.runs:
                for protocol, stages in run.evaluations.items():
                    for task, stage in stages.items():
                        result = outputs[stage.key].result_as(EvaluationOutput)
                        if protocol == HELDOUT:
                            self._add_heldout(model.id, protocol, run.random_seed, result)
                            continue
                        self._add(model.id, protocol, task, run.random_seed, result, result.metrics[self.primary[task]])
                if run.path is not None:
                    for ratio, point in outputs[run.path.key].result_as(PathOutput).points.items():
                        self._add_heldout(model.id, path_protocol(ratio), run.random_seed, point)

    def _add(self, model_id: str, protocol: str, task: str, seed: int, result: EvaluationOutput, value: float) -> None:
        samples = {name: np.asarray(v, dtype=float) for name, v in result.samples.items()}
        self.by_key[model_id, protocol, task, seed] = Observation(result.metrics, samples, value)
        if protocol in self.tasks and task not in self.tasks[protocol]:
            self.tasks[protocol].append(task)

    def _add_heldout(self, model_id: str, protocol: str, seed: int, result: EvaluationOutput) -> None:
        for name in HELDOUT_TASKS:
            self.primary.setdefault(name, name)
            one = EvaluationOutput(metrics={name: result.metrics[name]}, samples={name: result.samples[name]})
            self._add(model_id, protocol, name, seed, one, result.metrics[name])

    def protocol_tasks(self, protocol: str) -> list[str]:
        """The tasks a protocol scored, and MEAN when it scored several."""
        tasks = self.tasks.get(protocol, [])
        return [*tasks, MEAN] if len(tasks) > 1 and protocol != HELDOUT else list(tasks)

    def seeds(self, model_id: str, protocol: str, task: str) -> list[int]:
        first = task if task != MEAN else self.tasks[protocol][0]
        return sorted(seed for (m, p, t, seed) in self.by_key if (m, p, t) == (model_id, protocol, first))

    def _parts(self, model_id: str, protocol: str, task: str, seed: int) -> list[Observation]:
        tasks = self.tasks[protocol] if task == MEAN else [task]
        return [self.by_key[model_id, protocol, t, seed] for t in tasks]

    def _statistics(self, protocol: str, task: str) -> list[Statistic]:
        tasks = self.tasks[protocol] if task == MEAN else [task]
        return [partial(_heldout_statistic, t) if t in HELDOUT_TASKS else TASKS.get(t).primary_statistic for t in tasks]

    def score(self, model_id: str, protocol: str, task: str) -> TaskScore | None:
        """A model's score with its interval; None where it was not evaluated so."""
        seeds = self.seeds(model_id, protocol, task)
        if not seeds:
            return None
        statistics = self._statistics(protocol, task)
        per_seed, parts = {}, []
        for seed in seeds:
            observations = self._parts(model_id, protocol, task, seed)
            per_seed[seed] = float(np.mean([o.value for o in observations]))
            parts.append([Part.of(o.samples, stat) for o, stat in zip(observations, statistics)])
        metrics = {}
        if task != MEAN:
            names = self.by_key[model_id, protocol, task, seeds[0]].metrics
            metrics = {
                name: float(np.mean([self.by_key[model_id, protocol, task, s].metrics[name] for s in seeds]))
                for name in names
            }
        metric = self.primary[task] if task != MEAN else "mean of primary metrics"
        return TaskScore(metric, per_seed, estimate(list(per_seed.values()), parts), metrics)

    def difference(self, a: str, b: str, protocol: str, task: str) -> tuple[dict[int, float], Estimate] | None:
        """a − b paired by seed and, within a seed, by test example; None without a common seed."""
        return self.contrast({(a, protocol): 1.0, (b, protocol): -1.0}, task)

    def contrast(self, terms: Terms, task: str) -> tuple[dict[int, float], Estimate] | None:
        """Σ weight × score over (model, protocol) terms, paired by seed and within a seed by test example
        (every term of a part is resampled with the same examples); None without a seed common to all."""
        keys = list(terms)
        common = set.intersection(*(set(self.seeds(m, p, task)) for m, p in keys)) if keys else set()
        if not common:
            return None
        statistics = self._statistics(keys[0][1], task)
        weights = [terms[key] for key in keys]
        per_seed, parts = {}, []
        for seed in sorted(common):
            columns = [self._parts(m, p, task, seed) for m, p in keys]
            rows = list(zip(*columns))  # per task of the score: each term's observation
            per_seed[seed] = float(np.mean([sum(w * o.value for w, o in zip(weights, row)) for row in rows]))
            parts.append([_paired(row, weights, keys, stat) for row, stat in zip(rows, statistics)])
        return per_seed, estimate(list(per_seed.values()), parts)


def _paired(
    row: Sequence[Observation], weights: Sequence[float], keys: Sequence[tuple[str, str]], statistic: Statistic
) -> Part:
    """The terms of one task's part, checked to be scored on the same test examples."""
    first = row[0].samples
    for observation, key in zip(row[1:], keys[1:]):
        other = observation.samples
        if set(other) != set(first) or any(other[name].shape != first[name].shape for name in first):
            shapes = {name: (first[name].shape, other.get(name, np.empty(0)).shape) for name in first}
            raise ConfigError(
                f"{keys[0][0]} and {key[0]} were scored on different test examples {shapes}; cannot pair them"
            )
    return Part(tuple((w, o.samples) for w, o in zip(weights, row)), statistic)
