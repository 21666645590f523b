"""What the stages measured, per model, protocol, task and random seed, and the intervals over them.

The per-example values behind every score (`samples`) stay here, in memory: results.json keeps the
per-seed scores and their intervals, not every test example. Scores and paired differences are
estimated through `stats.estimate`, over seeds and over test examples.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vlmerge.core.errors import ConfigError
from vlmerge.study.cache import StageOutput
from vlmerge.study.plan import StudyPlan
from vlmerge.study.results import MEAN, TaskScore
from vlmerge.study.stages import EvaluationOutput
from vlmerge.study.stats import Estimate, Statistic, estimate
from vlmerge.tasks import TASKS


@dataclass(frozen=True)
class Observation:
    """One evaluation: a model under one seed, one protocol, one task."""

    metrics: Mapping[str, float]
    samples: Mapping[str, np.ndarray]
    value: float  # the task's primary metric


class Observations:
    def __init__(self, plan: StudyPlan, outputs: Mapping[str, StageOutput]) -> None:
        self.tasks = {protocol: [] for protocol in plan.recipe.protocols}
        self.primary = {task: TASKS.get(task).primary_metric for task in plan.recipe.tasks}
        self.primary.setdefault("retrieval", TASKS.get("retrieval").primary_metric)  # zero-shot reads it
        self.by_key: dict[tuple[str, str, str, int], Observation] = {}
        for model in plan.models.values():
            for run in model.runs:
                for protocol, stages in run.evaluations.items():
                    for task, stage in stages.items():
                        result = outputs[stage.key].result_as(EvaluationOutput)
                        samples = {name: np.asarray(v, dtype=float) for name, v in result.samples.items()}
                        observation = Observation(result.metrics, samples, result.metrics[self.primary[task]])
                        self.by_key[model.id, protocol, task, run.random_seed] = observation
                        if task not in self.tasks[protocol]:
                            self.tasks[protocol].append(task)

    def protocol_tasks(self, protocol: str) -> list[str]:
        """The tasks a protocol scored, and MEAN when it scored several."""
        tasks = self.tasks.get(protocol, [])
        return [*tasks, MEAN] if len(tasks) > 1 else list(tasks)

    def seeds(self, model_id: str, protocol: str, task: str) -> list[int]:
        first = task if task != MEAN else self.tasks[protocol][0]
        return sorted(seed for (m, p, t, seed) in self.by_key if (m, p, t) == (model_id, protocol, first))

    def _parts(self, model_id: str, protocol: str, task: str, seed: int) -> list[Observation]:
        tasks = self.tasks[protocol] if task == MEAN else [task]
        return [self.by_key[model_id, protocol, t, seed] for t in tasks]

    def _statistics(self, protocol: str, task: str) -> list[Statistic]:
        tasks = self.tasks[protocol] if task == MEAN else [task]
        return [TASKS.get(t).primary_statistic for t in tasks]

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
            parts.append([(o.samples, stat) for o, stat in zip(observations, statistics)])
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
        seeds = sorted(set(self.seeds(a, protocol, task)) & set(self.seeds(b, protocol, task)))
        if not seeds:
            return None
        statistics = self._statistics(protocol, task)
        per_seed, parts = {}, []
        for seed in seeds:
            pairs = list(zip(self._parts(a, protocol, task, seed), self._parts(b, protocol, task, seed)))
            per_seed[seed] = float(np.mean([x.value - y.value for x, y in pairs]))
            parts.append([(_paired(x.samples, y.samples, a, b), stat) for (x, y), stat in zip(pairs, statistics)])
        return per_seed, estimate(list(per_seed.values()), parts)


def _paired(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], a: str, b: str) -> dict[str, np.ndarray]:
    """Per-example differences (every primary statistic is a mean of per-example values, so the
    statistic of the differences is the difference of the statistics)."""
    if set(x) != set(y) or any(x[name].shape != y[name].shape for name in x):
        shapes = {name: (x[name].shape, y.get(name, np.empty(0)).shape) for name in x}
        raise ConfigError(f"{a} and {b} were scored on different test examples {shapes}; cannot pair them")
    return {name: x[name] - y[name] for name in x}
