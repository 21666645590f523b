"""Intervals for the study: a score over random seeds and test examples, by a two-level bootstrap.

A score is the mean over seeds of one number per seed. Two sources of uncertainty: which seeds were
drawn (training randomness) and which test examples happened to be in the test set. One interval
covers both: each bootstrap resample draws seeds with replacement, then test examples with
replacement, and recomputes the score from the resampled per-example values. The test set of a task
is one draw shared by every seed (the same examples in the same order), so where a sample array has
the same length under every seed its examples are resampled with the same indices for all of them
(a crossed design); resampling them independently per seed would treat one shared test set as S
independent ones and shrink its share of the error S-fold. Arrays whose length differs between seeds
are resampled within each seed (nested).

The interval is mean +- t(S-1) x se, se the bootstrap's standard deviation rescaled by sqrt(S/(S-1))
(the bootstrap's variance of a mean over S values is (S-1)/S of the unbiased one): with negligible
test-set noise it is exactly the t-interval over seeds; where test-set noise dominates it is a little
conservative. A paired comparison runs the same on per-example differences: every primary metric is a
mean of per-example values (or a mean of such means), so the difference of two scores on the same
test examples is the statistic of the per-example differences.

Correlations (mergeability, seed length) are Spearman's rho with a bootstrap interval over points.
All from scipy.stats and numpy; resampling is seeded, so the same numbers give the same intervals.
"""

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CHUNK_VALUES = 4_000_000  # resampled values held at once (32 MB of float64)

Samples = Mapping[str, np.ndarray]  # one seed's per-example values of one task, by sample name
Statistic = Callable[[Samples], float | np.ndarray]  # a task's primary metric from its samples (vectorised)


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its 95 % interval, from the standard error over seeds and test examples."""

    mean: float
    low: float
    high: float
    seeds: int
    se: float | None = None  # None: nothing to resample (one seed, no per-example values)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def df(self) -> float:
        """Degrees of freedom of the interval's t quantile: seeds - 1 (normal with one seed)."""
        return self.seeds - 1 if self.seeds > 1 else math.inf

    def excludes_zero(self) -> int:
        """+1 when the interval lies above zero, -1 below, 0 when it contains zero."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def to_json(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "seeds": self.seeds, "se": self.se}

    @classmethod
    def from_json(cls, data: Mapping[str, float | int | None]) -> "Estimate":
        return cls(data["mean"], data["low"], data["high"], data["seeds"], data.get("se"))


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided t quantile (normal for infinite df)."""
    tail = 1 - (1 - confidence) / 2
    return float(stats.norm.ppf(tail) if math.isinf(df) else stats.t.ppf(tail, df))


@dataclass(frozen=True)
class Part:
    """One task's share of a seed's score: Σ weight × statistic(samples) over its terms, the terms being
    models scored on the same test examples (a score: one term; a paired difference: two). Resampled,
    every term takes the same examples, so a statistic that is not a mean of per-example values (mIoU
    from per-image counts) still pairs correctly."""

    terms: tuple[tuple[float, Samples], ...]
    statistic: Statistic

    @classmethod
    def of(cls, samples: Samples, statistic: Statistic) -> "Part":
        return cls(((1.0, samples),), statistic)


Parts = Sequence[Sequence[Part]]  # per seed: the parts its score averages


def _examples(values: np.ndarray) -> int:
    """Examples lie along the last axis (a per-image row of counts is one example's column)."""
    return values.shape[-1] if values.ndim else 0


def bootstrap_means(parts: Parts, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray | None:
    """`resamples` draws of the mean over seeds, seeds and test examples resampled (see the module's
    docstring); None where an array has fewer than two examples (nothing to resample)."""
    seeds = len(parts)
    arrays: dict[tuple[int, int, int, str], np.ndarray] = {}
    for s, seed_parts in enumerate(parts):
        for p, part in enumerate(seed_parts):
            for t, (_, samples) in enumerate(part.terms):
                for name, values in samples.items():
                    arrays[s, p, t, name] = np.asarray(values, dtype=np.float64)
    if not arrays or any(_examples(a) < 2 for a in arrays.values()):
        return None
    lengths: dict[tuple[int, str], set[int]] = {}  # the terms of a part share their examples
    for (s, p, _, name), values in arrays.items():
        lengths.setdefault((p, name), set()).add(_examples(values))
        lengths.setdefault((s, p, name), set()).add(_examples(values))
    shared = {key for key, found in lengths.items() if len(key) == 2 and len(found) == 1 and seeds > 1}
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, seeds, size=(resamples, seeds))
    per_resample = max(1, sum(a.size for a in arrays.values()))
    chunk = max(1, min(resamples, CHUNK_VALUES // per_resample))
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        # In a fixed order: a set's order of string keys changes from one process to the next.
        common = {key: rng.integers(0, n, size=(count, n)) for key in sorted(shared) for n in lengths[key]}
        scores = np.empty((count, seeds))
        for s in range(seeds):
            by_part = []
            for p, part in enumerate(parts[s]):
                rows = {}
                for name in part.terms[0][1]:
                    (n,) = lengths[s, p, name] if len(lengths[s, p, name]) == 1 else (None,)
                    if n is None:
                        raise ValueError(f"the terms of part {p} of seed {s} differ in their {name!r} examples")
                    rows[name] = common.get((p, name))
                    if rows[name] is None:
                        rows[name] = rng.integers(0, n, size=(count, n))
                score = sum(
                    weight * np.asarray(part.statistic({n: np.take(v, rows[n], axis=-1) for n, v in samples.items()}))
                    for weight, samples in part.terms
                )
                by_part.append(np.asarray(score, dtype=np.float64))
            scores[:, s] = np.mean(by_part, axis=0)
        means[start : start + count] = np.take_along_axis(scores, picked[start : start + count], axis=1).mean(axis=1)
    return means


def estimate(values: Sequence[float], parts: Parts | None = None) -> Estimate:
    """The mean of per-seed `values` with one 95 % interval over seeds and test examples.

    `parts`, when given, are the per-example samples behind each seed's value (see `bootstrap_means`);
    without them (or with one example) only the seeds are resampled, i.e. Student's t over seeds."""
    values = np.asarray(values, dtype=np.float64)
    mean, seeds = float(values.mean()), len(values)
    draws = bootstrap_means(parts) if parts else None
    if draws is not None:
        se = float(draws.std(ddof=1)) * (math.sqrt(seeds / (seeds - 1)) if seeds > 1 else 1.0)
    elif seeds > 1:
        se = float(values.std(ddof=1)) / math.sqrt(seeds)
    else:
        return Estimate(mean, mean, mean, seeds)
    result = Estimate(mean, mean, mean, seeds, se)
    half = t_quantile(result.df) * se
    return Estimate(mean, mean - half, mean + half, seeds, se)


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
