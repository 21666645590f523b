"""Decisions for the study: whether a claim is reproduced, contradicted, equivalent, or undecided.

`stats` gives intervals; this module turns them into verdicts. The pieces: a hierarchical bootstrap
(seeds, then test examples within seeds) for the interval, an exact sign-flip test over seeds for the
p-value, Holm's correction across a family of claims, two one-sided t-tests (TOST) for equivalence
within a margin, and a power line that says what a run of this size could have detected at all.

All functions are pure over numpy arrays; resampling takes an explicit `numpy.random.Generator`, so
the same inputs and generator state give the same numbers.
"""

import math
from collections.abc import Sequence
from enum import Enum

import numpy as np
from scipy import stats

SIGN_FLIP_MAX_SEEDS = 20  # 2**20 sums: about 8 MB, well under a second
TIE_RTOL = 1e-9  # relative tolerance when comparing permuted and observed statistics


def hierarchical_bootstrap(
    per_seed: Sequence[np.ndarray],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of per-seed means, resampling both levels.

    Why two levels: a score varies with the seeds drawn and with the test examples drawn, so each
    resample first draws seeds with replacement, then, independently for every drawn seed, its examples
    with replacement. For a paired comparison pass per-example differences. Vectorised over resamples:
    one draw per seed for all the places that seed was picked.
    """
    arrays = [np.asarray(a, dtype=float).ravel() for a in per_seed]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("hierarchical_bootstrap needs at least one seed, each with at least one example")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}")
    seeds = len(arrays)
    picked = rng.integers(0, seeds, size=(resamples, seeds))
    seed_means = np.empty((resamples, seeds))
    for j, values in enumerate(arrays):
        where = picked == j
        count = int(where.sum())
        if count:
            draws = rng.integers(0, len(values), size=(count, len(values)))
            seed_means[where] = values[draws].mean(axis=1)
    means = seed_means.mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided paired randomisation (sign-flip) p-value over seeds.

    Why exact: with a handful of seeds a t-test leans on normality we cannot check, while under the
    null of no effect each seed's difference is as likely negative as positive, so enumerating all
    2^n sign patterns gives the exact null distribution of the mean. p is the fraction of patterns whose
    |mean| is at least the observed |mean| (ties within a small relative tolerance count as at least).

    With n seeds the smallest attainable p is 2/2^n: n=5 gives 0.0625, so 6 seeds are needed for
    p < 0.05. Refuses more than 20 seeds (ValueError): 2^n sums would no longer be cheap.
    """
    d = np.asarray(differences, dtype=float).ravel()
    if len(d) == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if len(d) > SIGN_FLIP_MAX_SEEDS:
        raise ValueError(f"sign_flip_p enumerates 2^n patterns; n={len(d)} exceeds the limit of {SIGN_FLIP_MAX_SEEDS}")
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_p needs finite differences")
    sums = np.zeros(1)
    for value in d:  # all 2^n signed sums by doubling; the mean is the sum over the same n
        sums = np.concatenate((sums + value, sums - value))
    observed = abs(float(d.sum()))
    tolerance = TIE_RTOL * float(np.abs(d).sum())
    return float(np.mean(np.abs(sums) >= observed - tolerance))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order (monotone in p, capped at 1).

    Why Holm and not Benjamini-Hochberg: a claim's verdict is a family-wise statement (no claim in the
    family is called reproduced unless the chance of any false call is below alpha), which is what Holm
    controls; Benjamini-Hochberg controls only the expected share of false calls. Holm needs no
    assumption about how the tests depend on each other.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("holm needs p-values in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    result = np.empty(m)
    result[order] = adjusted
    return result


def tost_p(per_seed_differences: Sequence[float], margin: float) -> float:
    """Two one-sided t-tests over seeds against -margin and +margin; the larger one-sided p-value.

    Why: a wide interval around zero is not evidence of no effect. Equivalence is claimed only when
    the mean difference is shown to be above -margin AND below +margin; the p-value of that joint claim
    is the larger of the two. Constant differences (zero spread) give 0 inside the margin, 1 outside.
    """
    d = np.asarray(per_seed_differences, dtype=float).ravel()
    if len(d) < 2:
        raise ValueError("tost_p needs at least two seeds")
    if not margin > 0:
        raise ValueError(f"tost_p needs a positive margin, got {margin}")
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    df = len(d) - 1
    above_lower = float(stats.t.sf((mean + margin) / se, df))  # H0: mean <= -margin
    below_upper = float(stats.t.cdf((mean - margin) / se, df))  # H0: mean >= +margin
    return max(above_lower, below_upper)


def equivalence(per_seed_differences: Sequence[float], margin: float, *, confidence: float = 0.95) -> bool:
    """True when TOST shows the mean difference lies within ±margin at level 1 - confidence."""
    return tost_p(per_seed_differences, margin) < 1 - confidence


class Verdict(str, Enum):
    """What the study says about a claim."""

    REPRODUCED = "reproduced"
    CONTRADICTED = "contradicted"
    EQUIVALENT = "equivalent"
    INCONCLUSIVE = "inconclusive"


def decide(
    interval: tuple[float, float],
    adjusted_p: float,
    tost_p: float | None,
    direction: int,
    alpha: float = 0.05,
) -> Verdict:
    """The verdict from an interval of the difference, its family-adjusted p, and a TOST p.

    Why both interval and p: the interval must exclude zero on one side (the effect's sign) and the
    family-wise adjusted p must be below alpha (the effect is not one of many lucky draws). Reproduced
    when that side is the claim's `direction` (+1 or -1), contradicted when it is the other; otherwise
    equivalent when TOST p < alpha (None: no margin, not tested); otherwise inconclusive.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    low, high = interval
    side = 1 if low > 0 else -1 if high < 0 else 0
    if side != 0 and adjusted_p < alpha:
        return Verdict.REPRODUCED if side == direction else Verdict.CONTRADICTED
    if tost_p is not None and tost_p < alpha:
        return Verdict.EQUIVALENT
    return Verdict.INCONCLUSIVE


def power_line(
    per_seed_differences: Sequence[float],
    target: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> tuple[float, int]:
    """The smallest difference this run could detect, and the seeds needed to detect `target`.

    Why: an inconclusive verdict means little unless one says how large an effect the run could have
    seen. detectable = (t_{1-alpha/2, n-1} + t_{power, n-1}) * s / sqrt(n), s the seed-to-seed sd of the
    differences; seeds needed = ceil(((z_{1-alpha/2} + z_power) * s / target)^2), at least 2 (normal
    approximation, so optimistic for very few seeds).
    """
    d = np.asarray(per_seed_differences, dtype=float).ravel()
    if len(d) < 2:
        raise ValueError("power_line needs at least two seeds")
    if not target != 0 or not math.isfinite(target):
        raise ValueError(f"power_line needs a finite nonzero target, got {target}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"need 0 < alpha < 1 and 0 < power < 1, got {alpha}, {power}")
    n = len(d)
    sd = float(d.std(ddof=1))
    detectable = (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    exact = (z * sd / abs(target)) ** 2
    needed = math.ceil(exact * (1 - 1e-12))  # a product that lands a hair above an integer stays that integer
    return float(detectable), max(2, needed)
