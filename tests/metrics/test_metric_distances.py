"""Mergeability metrics: hand-computed values, independent numpy re-computations, properties."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vlmerge.core.errors import ConfigError, MergeError
from vlmerge.metrics.distances import (
    METRICS,
    cosine_dissimilarity,
    l2_distance,
    metric_fn,
    normalized_l2_distance,
    soft_sign_dissimilarity,
    truncated_soft_sign_dissimilarity,
)

FAST = settings(max_examples=50, deadline=None)

# Upper bounds of the bounded metrics; a metric not listed is only checked to be >= 0.
UPPER_BOUND = {"l2_normalized": 1.0, "cosine": 2.0, "ssd": 1.0, "tssd": 1.0}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- hand-computed values
# x = [1, -2, 0, 3], y = [1, 2, 0, -1]
#   x - y = [0, -4, 0, 4]          -> ||x - y|| = sqrt(32)
#   ||x|| = sqrt(1 + 4 + 9) = sqrt(14), ||y|| = sqrt(1 + 4 + 1) = sqrt(6)
#   x . y = 1 - 4 + 0 - 3 = -6     -> cos = -6 / sqrt(84)
#   SSD per entry: 1 - |2|/2 = 0; 1 - |0|/4 = 1; (0, 0) skipped; 1 - |2|/4 = 1/2
#                  -> mean over 3 entries = 1.5 / 3 = 1/2
X, Y = t(1, -2, 0, 3), t(1, 2, 0, -1)


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        (l2_distance, math.sqrt(32)),
        (normalized_l2_distance, math.sqrt(32) / (math.sqrt(14) + math.sqrt(6))),
        (cosine_dissimilarity, 1 + 6 / math.sqrt(84)),
        (soft_sign_dissimilarity, 0.5),
        (partial(truncated_soft_sign_dissimilarity, top_k=1.0), 0.5),  # top_k=1 keeps everything: SSD
        # default top_k=0.2 keeps ceil(0.8) = 1 entry each: x -> [0, 0, 0, 3], y -> [0, 2, 0, 0] -> [0, 0]
        (truncated_soft_sign_dissimilarity, 0.0),
    ],
)
def test_hand_computed_example(metric, expected):
    assert metric(X, Y) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (t(1, 0), t(0, 1), 1.0),  # orthogonal
        (t(1, 2), t(-2, -4), 2.0),  # opposite directions
        (t(3, 4), t(6, 8), 0.0),  # same direction, different length
        (t(0, 0), t(0, 0), 0.0),  # both zero: defined as 0
        (t(0, 0), t(1, -1), 1.0),  # exactly one zero: defined as 1
        (t(1, -1), t(0, 0), 1.0),
    ],
)
def test_cosine_special_cases(x, y, expected):
    assert cosine_dissimilarity(x, y) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (t(1, -2), t(-1, 2), 1.0),  # ||2x|| / (2 ||x||)
        (t(0, 0), t(0, 0), 0.0),  # both zero: defined as 0
        (t(0, 0), t(3, 4), 1.0),  # 5 / (0 + 5)
        (t(3, 4), t(6, 8), 1 / 3),  # ||(-3, -4)|| / (5 + 10) = 5 / 15
    ],
)
def test_normalized_l2_special_cases(x, y, expected):
    assert normalized_l2_distance(x, y) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (t(2, 3), t(1, 5), 0.0),  # signs agree everywhere
        (t(2, -3), t(-2, 3), 1.0),  # exactly opposite everywhere
        (t(0, 0), t(0, 0), 0.0),  # every entry skipped
        (t(0, 5), t(0, -5), 1.0),  # the (0, 0) entry is skipped, not counted as 0
        (t(4, 0), t(0, -1), 0.0),  # one side zero: no disagreement
        (t(3, 1), t(-1, 1), 0.25),  # [1 - 2/4, 0] -> 1/4
    ],
)
def test_ssd_special_cases(x, y, expected):
    assert soft_sign_dissimilarity(x, y) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("metric", "x", "y", "expected"),
    [
        (l2_distance, t(3e-200, 0), t(0, -4e-200), 5e-200),
        (l2_distance, t(3e200, 0), t(0, -4e200), 5e200),
        (cosine_dissimilarity, t(1e-200, 0), t(0, 1e-200), 1.0),  # squares would underflow to 0
        (cosine_dissimilarity, t(1e200, 1e200), t(1e200, 1e200), 0.0),  # squares would overflow to inf
        (normalized_l2_distance, t(1e-200, 0), t(-1e-200, 0), 1.0),
        (normalized_l2_distance, t(1e200, 0), t(0, 1e200), 2**0.5 / 2),
    ],
)
def test_extreme_magnitudes(metric, x, y, expected):
    assert metric(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", METRICS.names())
def test_empty_tensors(name):
    assert metric_fn(name)(torch.empty(0, 3), torch.empty(0, 3)) == 0.0


# TSSD case where trimming changes the answer:
# x = [4, 3, -1, 0.5], y = [-5, 4, 1, 2]
#   SSD (no trimming): [1 - 1/9, 0, 1 - 0/2, 0] -> (8/9 + 1) / 4 = 17/36
#   top_k=0.5 keeps ceil(2) = 2 per tensor: x -> [4, 3, 0, 0], y -> [-5, 4, 0, 0]
#       -> [8/9, 0] over the 2 kept entries, the both-zero ones skipped -> 4/9
#   top_k=0.2 (default) keeps ceil(0.8) = 1: x -> [4, 0, 0, 0], y -> [-5, 0, 0, 0] -> 8/9
#   top_k=0.01 keeps at least 1 -> same as 0.2
TX, TY = t(4, 3, -1, 0.5), t(-5, 4, 1, 2)


@pytest.mark.parametrize(("top_k", "expected"), [(1.0, 17 / 36), (0.5, 4 / 9), (0.2, 8 / 9), (0.01, 8 / 9)])
def test_tssd_trimming(top_k, expected):
    assert truncated_soft_sign_dissimilarity(TX, TY, top_k=top_k) == pytest.approx(expected, rel=1e-15)
    assert metric_fn("tssd", top_k)(TX, TY) == pytest.approx(expected, rel=1e-15)


def test_tssd_default_top_k_and_ssd_differ_when_trimming_matters():
    assert soft_sign_dissimilarity(TX, TY) == pytest.approx(17 / 36)
    assert truncated_soft_sign_dissimilarity(TX, TY) == pytest.approx(8 / 9)
    assert METRICS.get("tssd")(TX, TY) == pytest.approx(8 / 9)


def test_tssd_compares_entries_kept_by_either_tensor():
    # top_k=0.5 of 4: x keeps entries 0, 1; y keeps entries 2, 3 -> no overlap, and on each
    # kept entry the other side is trimmed to 0, so there is no disagreement at all.
    # Untrimmed: [1 - 8/10, 1 - 7/9, 1 - 8/10, 1 - 7/9] -> (2/10 + 2/9) / 2 = 19/90.
    x, y = t(9, 8, -1, -1), t(-1, -1, 9, 8)
    assert soft_sign_dissimilarity(x, y) == pytest.approx(19 / 90, rel=1e-15)
    assert truncated_soft_sign_dissimilarity(x, y, top_k=0.5) == 0.0


# --------------------------------------------------------------------------- independent numpy versions
def np_l2(a, b):
    return math.sqrt(sum((ai - bi) ** 2 for ai, bi in zip(a, b)))


def np_normalized_l2(a, b):
    return np_l2(a, b) / (np.sqrt(np.sum(a * a)) + np.sqrt(np.sum(b * b)))


def np_cosine(a, b):
    return 1.0 - float(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))


def np_ssd(a, b):
    terms = [1.0 - abs(ai + bi) / (abs(ai) + abs(bi)) for ai, bi in zip(a, b) if ai != 0 or bi != 0]
    return sum(terms) / len(terms) if terms else 0.0


def np_trim(a, top_k):
    keep = max(1, math.ceil(top_k * a.size))
    out = np.zeros_like(a)
    largest = np.argsort(-np.abs(a), kind="stable")[:keep]
    out[largest] = a[largest]
    return out


def np_tssd(a, b, top_k=0.2):
    return np_ssd(np_trim(a, top_k), np_trim(b, top_k))


NUMPY_VERSIONS = {"l2": np_l2, "l2_normalized": np_normalized_l2, "cosine": np_cosine, "ssd": np_ssd, "tssd": np_tssd}


def random_pair(seed: int, shape=(7, 5), zeros: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tensors (the metrics must still compute in float64) with some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(shape, generator=gen) for _ in range(2))
    x[torch.rand(shape, generator=gen) < zeros] = 0
    y[torch.rand(shape, generator=gen) < zeros] = 0
    return x, y


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(NUMPY_VERSIONS))
def test_matches_numpy(name, seed):
    x, y = random_pair(seed)
    a, b = x.double().flatten().numpy(), y.double().flatten().numpy()
    assert metric_fn(name)(x, y) == pytest.approx(NUMPY_VERSIONS[name](a, b), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("top_k", [0.05, 0.3, 0.5, 0.9, 1.0])
def test_tssd_matches_numpy_for_any_top_k(top_k):
    x, y = random_pair(7, shape=(200,))
    a, b = x.double().numpy(), y.double().numpy()
    assert truncated_soft_sign_dissimilarity(x, y, top_k) == pytest.approx(np_tssd(a, b, top_k), rel=1e-12)


def test_every_registered_metric_has_a_numpy_version():
    assert set(METRICS.names()) == set(NUMPY_VERSIONS)


# --------------------------------------------------------------------------- properties
# Finite float64 values; tiny ones are flushed to exact 0 so that scaling cannot underflow them.
ELEMENT = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def pairs(draw, nonzero_x: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 24))
    both = draw(hnp.arrays(np.float64, (2, n), elements=ELEMENT))
    both[np.abs(both) < 1e-6] = 0.0
    x, y = torch.from_numpy(both)
    if nonzero_x:
        assume(bool(x.any()))
    return x.clone(), y.clone()


@pytest.mark.parametrize("name", METRICS.names())
@FAST
@given(pairs())
def test_common_properties(name, pair):
    """Every registered metric: a float in its bounds, symmetric, 0 on identical inputs, inputs untouched."""
    x, y = pair
    x32, y32 = x.float(), y.float()
    originals = [v.clone() for v in (x, y, x32, y32)]
    metric = metric_fn(name)

    value = metric(x, y)
    assert type(value) is float and type(metric(x32, y32)) is float
    assert 0.0 <= value <= UPPER_BOUND.get(name, math.inf)
    assert metric(y, x) == pytest.approx(value, rel=1e-12, abs=1e-12), "not symmetric"
    assert metric(x, x.clone()) == pytest.approx(0.0, abs=1e-12), "not 0 on identical inputs"
    assert all(torch.equal(v, o) and v.dtype == o.dtype for v, o in zip((x, y, x32, y32), originals)), "input modified"


# Value on (x, -x) for nonzero x: signs disagree everywhere, directions are opposite.
ON_OPPOSITE = {"ssd": 1.0, "tssd": 1.0, "cosine": 2.0, "l2_normalized": 1.0}
SCALE_FREE = ["ssd", "cosine", "l2_normalized"]  # unchanged when both inputs are scaled by c > 0


@FAST
@given(pairs(nonzero_x=True))
def test_opposite_inputs(pair):
    x, _ = pair
    values = {name: metric_fn(name)(x, -x) for name in ON_OPPOSITE}
    assert values == pytest.approx(ON_OPPOSITE, rel=1e-12)


@FAST
@given(pairs(), st.floats(1e-2, 1e2))
def test_invariant_to_scaling_both_by_a_positive_scalar(pair, scale):
    x, y = pair
    scaled = {name: metric_fn(name)(scale * x, scale * y) for name in SCALE_FREE}
    assert scaled == pytest.approx({name: metric_fn(name)(x, y) for name in SCALE_FREE}, rel=1e-9, abs=1e-12)


@FAST
@given(pairs(), st.floats(1e-2, 1e2))
def test_cosine_invariant_to_scaling_either_input(pair, scale):
    # SSD is not: SSD([1], [-1]) = 1 but SSD([0.5], [-1]) = 1 - 0.5/1.5 = 2/3.
    x, y = pair
    assert cosine_dissimilarity(scale * x, y) == pytest.approx(cosine_dissimilarity(x, y), rel=1e-9, abs=1e-12)


@FAST
@given(pairs(), st.floats(1e-3, 1.0))
def test_tssd_bounded_and_symmetric_for_any_top_k(pair, top_k):
    x, y = pair
    value = truncated_soft_sign_dissimilarity(x, y, top_k)
    assert 0.0 <= value <= 1.0
    assert value == truncated_soft_sign_dissimilarity(y, x, top_k)


# --------------------------------------------------------------------------- errors and registry
@pytest.mark.parametrize("name", METRICS.names())
def test_shape_mismatch_names_both_shapes(name):
    with pytest.raises(MergeError, match=r"\(2, 3\).*\(3, 2\)"):
        metric_fn(name)(torch.zeros(2, 3), torch.zeros(3, 2))


def test_same_numel_different_shape_is_still_a_mismatch():
    with pytest.raises(MergeError):
        l2_distance(torch.zeros(6), torch.zeros(2, 3))


@pytest.mark.parametrize("top_k", [0.0, -0.1, 1.5, math.nan])
def test_bad_top_k(top_k):
    with pytest.raises(ConfigError, match="top_k"):
        truncated_soft_sign_dissimilarity(TX, TY, top_k=top_k)
    with pytest.raises(ConfigError, match="top_k"):
        metric_fn("tssd", top_k)


def test_registry_names_and_lookup():
    assert METRICS.names() == ["l2", "l2_normalized", "cosine", "ssd", "tssd"]
    assert metric_fn("ssd") is soft_sign_dissimilarity
    with pytest.raises(ConfigError, match="ssd"):
        metric_fn("sdd")
