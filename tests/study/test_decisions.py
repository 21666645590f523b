import itertools
import math

import numpy as np
import pytest
from scipy import stats

from vlmerge.study.decisions import Verdict, decide, fewest_seeds, holm, power_line, sign_flip_p, tost_p
from vlmerge.study.stats import Part, bootstrap_means, estimate


def _mean_statistic(samples, axis=-1):
    return np.mean(samples["x"], axis=axis)


def _simulated_study(rng, mean, seeds, examples, shared=True):
    """Per-seed per-example values: mean + seed effect + example effect (one test set shared by the
    seeds, or one per seed) + noise. The estimand is `mean` (every effect has expectation zero)."""
    example_effect = rng.normal(0, 1.0, size=examples)
    parts, values = [], []
    for effect in rng.normal(0, 0.3, size=seeds):
        own = example_effect if shared else rng.normal(0, 1.0, size=examples)
        x = mean + effect + own + rng.normal(0, 0.5, size=examples)
        parts.append([Part.of({"x": x}, _mean_statistic)])
        values.append(x.mean())
    return values, parts


@pytest.mark.parametrize("shared", [True, False])
def test_the_two_level_interval_covers_the_known_mean_near_95_percent(shared):
    """Seeds and test examples both vary; the interval must cover the population mean about 95 % of the
    time (a little more where test-set noise dominates, by design conservative), where resampling the
    seeds alone (ignoring that the test set is one draw) falls well short when examples are shared."""
    rng = np.random.default_rng(12345)
    mean, studies = 0.3, 300
    covered = seeds_only = 0
    for _ in range(studies):
        values, parts = _simulated_study(rng, mean, seeds=8, examples=60, shared=shared)
        result = estimate(values, parts)
        covered += result.low <= mean <= result.high
        plain = estimate(values)  # Student's t over the per-seed values only
        seeds_only += plain.low <= mean <= plain.high
    assert 0.92 <= covered / studies <= 0.995
    if shared:
        assert seeds_only / studies < 0.85


def test_a_shared_test_set_is_resampled_once_for_every_seed():
    """With identical per-seed arrays, crossing resamples every seed with the same rows: the mean over
    seeds then varies exactly as one seed's mean does."""
    x = np.random.default_rng(3).normal(size=50)
    one = bootstrap_means([[Part.of({"x": x}, _mean_statistic)]])
    four = bootstrap_means([[Part.of({"x": x}, _mean_statistic)]] * 4)
    assert four.std() == pytest.approx(x.std(ddof=0) / math.sqrt(50), rel=0.1)
    assert four.std() == pytest.approx(one.std(), rel=0.1)


def test_the_interval_is_deterministic_and_is_students_t_without_examples():
    rng = np.random.default_rng(7)
    values, parts = _simulated_study(rng, 0.0, seeds=4, examples=20)
    assert estimate(values, parts) == estimate(values, parts)
    plain = estimate([0.31, 0.35, 0.30])
    half = stats.t.ppf(0.975, 2) * np.std([0.31, 0.35, 0.30], ddof=1) / math.sqrt(3)
    assert (plain.low, plain.high) == pytest.approx(
        (np.mean([0.31, 0.35, 0.30]) - half, np.mean([0.31, 0.35, 0.30]) + half)
    )
    single = estimate([0.3])
    assert (single.low, single.high, single.se) == (0.3, 0.3, None)


def test_sign_flip_hand_computed():
    assert sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)
    assert sign_flip_p([0.7] * 5) == pytest.approx(2 / 32)
    assert sign_flip_p([0.7] * 6) == pytest.approx(2 / 64)
    assert sign_flip_p([0.0, 0.0]) == 1.0
    many = sign_flip_p(np.ones(21))  # beyond exact enumeration: seeded random patterns
    assert many == pytest.approx(2 / 2**21, abs=5e-5) and many > 0
    with pytest.raises(ValueError):
        sign_flip_p([])


def brute_force_sign_flip(d):
    d = np.asarray(d, dtype=float)
    observed = abs(d.mean())
    hits = [
        abs(np.mean(np.array(signs) * d)) >= observed - 1e-12 for signs in itertools.product((1, -1), repeat=len(d))
    ]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("seed", range(20))
def test_sign_flip_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(0.3, 1.0, size=int(rng.integers(1, 9)))
    if seed % 4 == 0:
        d = np.round(d, 1)  # ties among signed sums
    assert sign_flip_p(d) == pytest.approx(brute_force_sign_flip(d))


def test_holm_textbook():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    assert holm([]).shape == (0,)


def manual_holm(p):
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(ranked):
        running = max(running, (m - rank) * p[i])
        out[i] = min(1.0, running)
    return out


@pytest.mark.parametrize("seed", range(10))
def test_holm_matches_manual(seed):
    p = np.random.default_rng(seed).uniform(0, 0.2, size=7).tolist()
    np.testing.assert_allclose(holm(p), manual_holm(p))


def test_tost_tight_around_zero_is_equivalent():
    assert tost_p(0.01, 0.05, 5, margin=0.5) < 0.001


def test_tost_mean_near_margin_is_not_equivalent():
    assert tost_p(0.5, 0.02, 4, margin=0.5) > 0.3


def test_tost_matches_formula():
    d = np.array([0.1, -0.2, 0.3, 0.05, 0.0])
    se = d.std(ddof=1) / math.sqrt(len(d))
    lower = 1 - stats.t.cdf((d.mean() + 0.4) / se, len(d) - 1)
    upper = stats.t.cdf((d.mean() - 0.4) / se, len(d) - 1)
    assert tost_p(d.mean(), se, len(d) - 1, 0.4) == pytest.approx(max(lower, upper))
    normal = max(stats.norm.sf((0.1 + 0.4) / se), stats.norm.cdf((0.1 - 0.4) / se))
    assert tost_p(0.1, se, math.inf, 0.4) == pytest.approx(normal)
    assert tost_p(0.1, None, 3, 0.4) == 0.0 and tost_p(0.5, 0.0, 3, 0.4) == 1.0
    with pytest.raises(ValueError):
        tost_p(0.1, 0.1, 3, 0.0)


def test_decide_each_verdict():
    assert decide((0.1, 0.5), 0.01, None, direction=1) is Verdict.REPRODUCED
    assert decide((-0.5, -0.1), 0.01, None, direction=-1) is Verdict.REPRODUCED
    assert decide((-0.5, -0.1), 0.01, 0.9, direction=1) is Verdict.CONTRADICTED
    assert decide((-0.1, 0.1), 0.5, 0.01, direction=1) is Verdict.EQUIVALENT
    assert decide((-0.1, 0.1), 0.5, 0.2, direction=1) is Verdict.INCONCLUSIVE
    assert decide((0.1, 0.5), 0.2, None, direction=1) is Verdict.INCONCLUSIVE  # interval alone is not enough
    assert Verdict.REPRODUCED == "reproduced"
    with pytest.raises(ValueError):
        decide((0.1, 0.5), 0.01, None, direction=0)


def test_power_line_matches_formula():
    n, se = 6, 0.05
    detectable, needed = power_line(se, n, target=0.05)
    assert detectable == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * se)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert needed == math.ceil(n * (z * se / 0.05) ** 2)
    assert power_line(se, n, target=100.0)[1] == 6  # the fewest seeds a sign-flip test decides at 0.05
    assert power_line(0.0, 3, target=0.1) == (0.0, 6)
    assert power_line(None, 1, target=0.1) == (0.0, 6)
    assert [fewest_seeds(a) for a in (0.05, 0.0625, 0.01)] == [6, 6, 8]
    assert all(2 / 2 ** fewest_seeds(a) < a <= 2 / 2 ** (fewest_seeds(a) - 1) for a in (0.05, 0.01, 0.2))
    with pytest.raises(ValueError):
        power_line(se, n, target=0.0)


def _iou(samples, axis=-1):
    """A ratio of sums (not a mean of per-example values): intersections over unions, per-image rows."""
    counts = np.asarray(samples["counts"]).sum(axis=axis)
    return counts[0] / counts[1]


def test_a_statistic_that_is_no_mean_is_paired_by_resampling_both_models_alike():
    rng = np.random.default_rng(5)
    unions = rng.integers(5, 50, size=(1, 40)).astype(float)
    a = np.vstack([np.floor(unions * rng.uniform(0.2, 0.9, size=(1, 40))), unions])
    b = np.vstack([np.floor(unions * rng.uniform(0.1, 0.8, size=(1, 40))), unions])
    same = Part(((1.0, {"counts": a}), (-1.0, {"counts": a})), _iou)
    draws = bootstrap_means([[same], [same]])
    assert np.all(draws == 0)  # each resample takes the same images for both terms
    different = Part(((1.0, {"counts": a}), (-1.0, {"counts": b})), _iou)
    point = _iou({"counts": a}) - _iou({"counts": b})
    result = estimate([point], [[different]])
    assert result.low < point < result.high
    with pytest.raises(ValueError, match="examples"):
        bootstrap_means([[Part(((1.0, {"counts": a}), (-1.0, {"counts": b[:, :30]})), _iou)]])
