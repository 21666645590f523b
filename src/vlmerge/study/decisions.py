"""Decisions for the study: whether a claim is reproduced, contradicted, equivalent, or undecided.

`stats` gives the interval (a two-level bootstrap over seeds and test examples); this module turns it
into a verdict. The pieces: an exact sign-flip test over seeds for the p-value, Holm's correction
across the family of comparisons a claim rests on, two one-sided tests (TOST) for equivalence within a
margin, and a power line that says what a run of this size could have detected at all.

All functions are pure; the same inputs give the same numbers.
"""

import math
from collections.abc import Sequence
from enum import Enum

import numpy as np
from scipy import stats

SIGN_FLIP_MAX_SEEDS = 20  # 2**20 sums: about 8 MB, well under a second; beyond, random patterns
SIGN_FLIP_DRAWS = 100_000  # random sign patterns for more seeds than that (seeded)
ALPHA = 0.05  # every test's level; Holm keeps it family-wise
TIE_RTOL = 1e-9  # relative tolerance when comparing permuted and observed statistics


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided paired randomisation (sign-flip) p-value over seeds.

    Why exact: with a handful of seeds a t-test leans on normality we cannot check, while under the
    null of no effect each seed's difference is as likely negative as positive, so enumerating all
    2^n sign patterns gives the exact null distribution of the mean. p is the fraction of patterns whose
    |mean| is at least the observed |mean| (ties within a small relative tolerance count as at least).

    With n seeds the smallest attainable p is 2/2^n: n=5 gives 0.0625, so 6 seeds are needed for
    p < 0.05. Beyond 20 seeds 2^n sums are no longer cheap: 100 000 random patterns (seeded) give
    p = (hits + 1) / (draws + 1), the usual Monte Carlo estimate that never reaches zero.
    """
    d = np.asarray(differences, dtype=float).ravel()
    if len(d) == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_p needs finite differences")
    observed = abs(float(d.sum()))
    tolerance = TIE_RTOL * float(np.abs(d).sum())
    if len(d) > SIGN_FLIP_MAX_SEEDS:
        signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(SIGN_FLIP_DRAWS, len(d)))
        hits = int(np.sum(np.abs(signs @ d) >= observed - tolerance))
        return (hits + 1) / (SIGN_FLIP_DRAWS + 1)
    sums = np.zeros(1)
    for value in d:  # all 2^n signed sums by doubling; the mean is the sum over the same n
        sums = np.concatenate((sums + value, sums - value))
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


def tost_p(mean: float, se: float | None, df: float, margin: float) -> float:
    """Two one-sided t-tests of a difference against -margin and +margin; the larger one-sided p.

    Why: a wide interval around zero is not evidence of no effect. Equivalence is claimed only when the
    mean difference is shown to be above -margin AND below +margin; the p-value of that joint claim is
    the larger of the two. `se` and `df` are the interval's (over seeds and test examples); with no
    spread (se 0 or None) it is 0 inside the margin and 1 outside.
    """
    if not margin > 0:
        raise ValueError(f"tost_p needs a positive margin, got {margin}")
    if not se:
        return 0.0 if abs(mean) < margin else 1.0
    distribution = stats.norm if math.isinf(df) else stats.t(df)
    above_lower = float(distribution.sf((mean + margin) / se))  # H0: mean <= -margin
    below_upper = float(distribution.cdf((mean - margin) / se))  # H0: mean >= +margin
    return max(above_lower, below_upper)


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
    alpha: float = ALPHA,
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
    se: float | None, seeds: int, target: float, *, alpha: float = 0.05, power: float = 0.8
) -> tuple[float, int]:
    """The smallest difference this run could detect, and the seeds needed to detect `target`.

    Why: an inconclusive verdict means little unless one says how large an effect the run could have
    seen. detectable = (t_{1-alpha/2, n-1} + t_{power, n-1}) * se, se the standard error of the
    difference over seeds and test examples; assuming se shrinks as 1/sqrt(seeds), the seeds needed
    for `target` are ceil(n * ((z_{1-alpha/2} + z_power) * se / target)^2) (normal quantiles, so
    optimistic for very few seeds), and never fewer than the exact sign-flip test needs to reach alpha
    at all (`fewest_seeds`: 6 at 0.05), however small the spread.
    """
    if not target != 0 or not math.isfinite(target):
        raise ValueError(f"power_line needs a finite nonzero target, got {target}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"need 0 < alpha < 1 and 0 < power < 1, got {alpha}, {power}")
    if seeds < 1:
        raise ValueError(f"power_line needs at least one seed, got {seeds}")
    se = se or 0.0
    if seeds > 1:
        detectable = (stats.t.ppf(1 - alpha / 2, seeds - 1) + stats.t.ppf(power, seeds - 1)) * se
    else:
        detectable = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    exact = seeds * (z * se / abs(target)) ** 2
    needed = math.ceil(exact * (1 - 1e-12))  # a product that lands a hair above an integer stays that integer
    return float(detectable), max(fewest_seeds(alpha), needed)


def fewest_seeds(alpha: float = ALPHA) -> int:
    """The fewest seeds whose exact sign-flip test can give p < alpha: its smallest p is 2 / 2^n."""
    return max(2, math.floor(math.log2(2 / alpha)) + 1)
