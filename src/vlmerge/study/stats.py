"""Intervals for the study: a score over random seeds, and over test examples by bootstrap.

A score is the mean over seeds of one number per seed. Two sources of uncertainty: which seeds
were drawn (a t-interval over the per-seed values) and which test examples happened to be in the
test set (a percentile bootstrap that resamples every seed's test examples). The reported 95 %
interval is the wider of the two. A paired comparison does the same on per-seed differences and on
per-example differences: every primary metric is a mean of per-example values (or a mean of such
means), so the difference of two scores on the same test examples is the statistic of the
per-example differences.

Correlations (mergeability, seed length) are Spearman's rho with a bootstrap interval over points.
All from scipy.stats; resampling is seeded, so the same numbers give the same intervals.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0

Samples = Mapping[str, np.ndarray]  # one seed's per-example values of one task, by sample name
Statistic = Callable[[Samples], float | np.ndarray]  # a task's primary metric from its samples (vectorised)


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % interval and where the interval's width comes from."""

    mean: float
    low: float
    high: float
    seeds: int
    seed_half_width: float | None  # t-interval over seeds; None with one seed
    example_half_width: float | None  # bootstrap over test examples; None without per-example values

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def source(self) -> str:
        """Which uncertainty sets the interval: 'seeds' or 'test examples'."""
        seed, example = self.seed_half_width, self.example_half_width
        return "test examples" if seed is None or (example is not None and example > seed) else "seeds"

    def excludes_zero(self) -> int:
        """+1 when the interval lies above zero, -1 below, 0 when it contains zero."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "seeds": self.seeds,
            "seed_half_width": self.seed_half_width,
            "example_half_width": self.example_half_width,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, float | int | None]) -> "Estimate":
        return cls(**data)


def seed_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """Student's t 95 % interval of the mean of per-seed values; None for fewer than two seeds."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return float(low), float(high)


def example_interval(per_seed: Sequence[Sequence[tuple[Samples, Statistic]]]) -> tuple[float, float] | None:
    """Percentile bootstrap of the mean over seeds of `statistic(samples)` summed over parts.

    `per_seed[s]` lists the parts of seed s's score (one task, or every task of a mean over tasks) as
    (samples, statistic); each seed's score is the mean of its parts' statistics. Every sample array is
    resampled on its own, so the test examples of each seed, task and direction vary independently.
    """
    layout = [
        (s, p, name) for s, parts in enumerate(per_seed) for p, (samples, _) in enumerate(parts) for name in samples
    ]
    if not layout:
        return None
    arrays = [np.asarray(per_seed[s][p][0][name], dtype=float) for s, p, name in layout]
    if any(len(a) < 2 for a in arrays):
        return None

    def score(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        by_part: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for (s, p, name), values in zip(layout, resampled):
            by_part.setdefault((s, p), {})[name] = values
        seeds = [
            np.mean([per_seed[s][p][1](by_part[s, p]) for p in range(len(per_seed[s]))], axis=0)
            for s in range(len(per_seed))
        ]
        return np.mean(seeds, axis=0)

    result = stats.bootstrap(
        arrays,
        score,
        n_resamples=RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def estimate(values: Sequence[float], parts: Sequence[Sequence[tuple[Samples, Statistic]]] | None = None) -> Estimate:
    """The mean of per-seed `values` with the wider of the seed and the test-example interval.

    `parts`, when given, are the per-example samples behind each seed's value (see `example_interval`).
    """
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    by_seed = seed_interval(values)
    by_example = example_interval(parts) if parts else None
    half = {
        name: None if interval is None else (interval[1] - interval[0]) / 2
        for name, interval in (("seed", by_seed), ("example", by_example))
    }
    candidates = [interval for interval in (by_seed, by_example) if interval is not None]
    low, high = max(candidates, key=lambda i: i[1] - i[0]) if candidates else (mean, mean)
    return Estimate(mean, low, high, len(values), half["seed"], half["example"])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho, or None when it is undefined (fewer than 3 points, or a constant input)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values, got {len(x)} and {len(y)}")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


@dataclass(frozen=True)
class Correlation:
    rho: float | None
    low: float | None
    high: float | None
    points: int

    def excludes_zero(self) -> int:
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def to_json(self) -> dict[str, float | int | None]:
        return {"rho": self.rho, "low": self.low, "high": self.high, "points": self.points}

    @classmethod
    def from_json(cls, data: Mapping[str, float | int | None]) -> "Correlation":
        return cls(**data)


def spearman_interval(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman's rho with a percentile bootstrap interval over the (x, y) points."""
    rho = spearman(x, y)
    if rho is None:
        return Correlation(None, None, None, len(x))

    def statistic(xs: np.ndarray, ys: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)  # expected: handled on the next line
            value = stats.spearmanr(xs, ys).statistic
        return 0.0 if np.isnan(value) else float(value)  # a resample with constant x or y carries no rank order

    result = stats.bootstrap(
        (np.asarray(x, float), np.asarray(y, float)),
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return Correlation(rho, float(result.confidence_interval.low), float(result.confidence_interval.high), len(x))
