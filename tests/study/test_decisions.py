import itertools
import math

import numpy as np
import pytest
from scipy import stats

from vlmerge.study.decisions import (
    Verdict,
    decide,
    equivalence,
    hierarchical_bootstrap,
    holm,
    power_line,
    sign_flip_p,
    tost_p,
)


def test_hierarchical_bootstrap_covers_the_known_mean():
    rng = np.random.default_rng(12345)
    mean, seeds, examples, studies = 0.3, 8, 50, 200
    covered = 0
    for _ in range(studies):
        seed_effect = rng.normal(0, 0.5, size=seeds)
        per_seed = [mean + effect + rng.normal(0, 3.0, size=examples) for effect in seed_effect]
        low, high = hierarchical_bootstrap(per_seed, resamples=500, rng=rng)
        covered += low <= mean <= high
    assert 0.88 <= covered / studies <= 0.99


def test_hierarchical_bootstrap_is_deterministic_and_brackets_the_estimate():
    data = [np.random.default_rng(s).normal(s, 1, size=20 + s) for s in range(4)]
    first = hierarchical_bootstrap(data, resamples=300, rng=np.random.default_rng(7))
    second = hierarchical_bootstrap(data, resamples=300, rng=np.random.default_rng(7))
    assert first == second
    point = np.mean([d.mean() for d in data])
    assert first[0] < point < first[1]
    with pytest.raises(ValueError):
        hierarchical_bootstrap([np.array([])], rng=np.random.default_rng(0))


def test_sign_flip_hand_computed():
    assert sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)
    assert sign_flip_p([0.7] * 5) == pytest.approx(2 / 32)
    assert sign_flip_p([0.7] * 6) == pytest.approx(2 / 64)
    assert sign_flip_p([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="20"):
        sign_flip_p(np.ones(21))


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
    d = [0.01, -0.02, 0.0, 0.015, -0.005, 0.01]
    assert tost_p(d, margin=0.5) < 0.001
    assert equivalence(d, 0.5)


def test_tost_mean_near_margin_is_not_equivalent():
    d = [0.45, 0.55, 0.5, 0.48, 0.52]
    assert tost_p(d, margin=0.5) > 0.3
    assert not equivalence(d, 0.5)


def test_tost_matches_formula():
    d = np.array([0.1, -0.2, 0.3, 0.05, 0.0])
    se = d.std(ddof=1) / math.sqrt(len(d))
    lower = 1 - stats.t.cdf((d.mean() + 0.4) / se, len(d) - 1)
    upper = stats.t.cdf((d.mean() - 0.4) / se, len(d) - 1)
    assert tost_p(d, 0.4) == pytest.approx(max(lower, upper))


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
    d = np.array([0.2, -0.1, 0.4, 0.0, 0.3, 0.1])
    n, s = len(d), d.std(ddof=1)
    detectable, needed = power_line(d, target=0.05)
    expected = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * s / math.sqrt(n)
    assert detectable == pytest.approx(expected)
    assert needed == math.ceil(((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * s / 0.05) ** 2)
    assert power_line(d, target=100.0)[1] == 2
    assert power_line([1.0, 1.0, 1.0], target=0.1) == (0.0, 2)
