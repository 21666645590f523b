"""Invariants of the merge methods and of the mergeability report over random shapes, values and options.

test_merge_methods.py checks each method against its closed form on fixed tensors and
test_metric_distances.py the distances themselves; here hypothesis varies shapes, weights and
options. Where a property holds only under a condition (arithmetic's lambda, DARE's drop, TIES'
density), the test names the condition and checks what holds outside it. test_svd_methods.py has
the SVD family's closed forms on fixed tensors; here they meet random shapes and values.
"""

import math
from itertools import combinations, permutations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vlmerge.core.modality import Modality
from vlmerge.io.checkpoint import reader_from_state_dict
from vlmerge.merging import MERGE_METHODS, MergeInputs, svd
from vlmerge.merging.geometric import NORM_FLOOR
from vlmerge.merging.registry import Statistics
from vlmerge.metrics import METRICS, mergeability, metric_fn
from vlmerge.metrics.distances import cosine_dissimilarity, l2_distance

V, L, VL = Modality.V, Modality.L, Modality.VL
FAST = settings(max_examples=25, deadline=None)
FEWER = settings(max_examples=10, deadline=None)  # each example builds a whole mergeability report

# Finite float64 entries away from underflow. Dyadic ones (multiples of 1/4 below 16) add, subtract
# and halve exactly, so symmetry can be checked bit for bit whatever order a method sums in.
REAL = st.floats(-100, 100, allow_nan=False, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-6 else x)
DYADIC = st.integers(-64, 64).map(lambda i: i / 4)
SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple)
MODALITY_SETS = st.sampled_from([(V, L), (V, L, VL)])
DENSITIES = st.sampled_from([0.125, 0.25, 0.5, 0.75, 1.0])  # exact in binary: density * numel has no rounding
GAMMAS = st.sampled_from([0.0, 0.125, 0.25])  # breadcrumbs' outlier fraction, exact in binary too


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def tensor(draw, shape, elements=REAL) -> torch.Tensor:
    return torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=elements)))


@st.composite
def expert_sets(draw, elements=REAL, linear: bool = False):
    """(experts by modality, origin), all of one random shape; (out, in) when `linear`."""
    shape = draw(st.tuples(st.integers(1, 5), st.integers(1, 5)) if linear else SHAPES)
    modalities = draw(MODALITY_SETS)
    return {m: tensor(draw, shape, elements) for m in modalities}, tensor(draw, shape, elements)


def spd_grams(modalities, n: int, seed: int) -> dict[Modality, torch.Tensor]:
    """Well-conditioned symmetric positive definite Gram matrices X^T X (+ a ridge), one per expert."""
    generator = torch.Generator().manual_seed(seed)
    grams = {}
    for m in modalities:
        x = torch.randn(n + 3, n, generator=generator, dtype=torch.float64)
        grams[m] = x.T @ x + 0.1 * torch.eye(n, dtype=torch.float64)
    return grams


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's G~ = alpha G + (1 - alpha) diag(G), written out again here."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram))


# --------------------------------------------------------------------------- identical experts
@st.composite
def copies(draw, elements=REAL, linear: bool = False):
    """(one weight w copied to every modality, w, an origin of its shape)."""
    experts, origin = draw(expert_sets(elements, linear))
    w = experts[V]
    return {m: w.clone() for m in experts}, w, origin


@FAST
@given(copies(), st.floats(0, 1))
def test_interpolating_copies_of_one_expert_returns_it(data, ratio):
    experts, w, _ = data
    torch.testing.assert_close(run("interpolation", MergeInputs("w", experts), ratio=ratio), w, rtol=1e-12, atol=1e-12)


@FAST
@given(copies(), st.floats(-2, 2))
def test_arithmetic_on_copies_scales_the_one_modality_vector_by_n_lambda(data, lam):
    """theta_0 + lam * N (w - theta_0): idempotent exactly when lam = 1/N (or w is the seed)."""
    experts, w, origin = data
    n = len(experts)
    merged = run("arithmetic", MergeInputs("w", experts, origin=origin), lam=lam)
    torch.testing.assert_close(merged, origin + n * lam * (w - origin), rtol=1e-9, atol=1e-9)
    idempotent = run("arithmetic", MergeInputs("w", experts, origin=origin), lam=1 / n)
    torch.testing.assert_close(idempotent, w, rtol=1e-9, atol=1e-9)


@FAST
@given(copies(linear=True), st.floats(0, 1), st.integers(0, 2**16))
def test_regmean_on_copies_returns_them_for_any_nonsingular_grams(data, alpha, seed):
    """(sum_m W G~_m)(sum_m G~_m)^-1 = W whatever the grams, as long as their sum is invertible."""
    experts, w, _ = data
    grams = spd_grams(experts, w.shape[1], seed)
    torch.testing.assert_close(
        run("regmean", MergeInputs("w", experts, grams=grams), alpha=alpha), w, rtol=1e-8, atol=1e-8
    )


@FAST
@given(copies(DYADIC), DENSITIES, st.floats(0.1, 2))
def test_ties_on_copies_keeps_the_top_k_of_the_one_modality_vector(data, density, lam):
    """Copies agree everywhere, so TIES reduces to its trim: theta_0 + lam * top_k(w - theta_0).
    Only density 1 with lam 1 returns w itself. Entries tied with the k-th largest magnitude may
    go either way, but exactly k entries are kept. Dyadic values: kept entries are exact."""
    experts, w, origin = data
    merged = run("ties", MergeInputs("w", experts, origin=origin), density=density, lam=lam).flatten()
    delta = (w - origin).flatten()
    k = max(1, math.ceil(density * delta.numel()))
    cutoff = delta.abs().sort(descending=True).values[k - 1]
    kept = (merged == origin.flatten() + lam * delta) & (delta != 0)
    trimmed = merged == origin.flatten()
    assert bool((kept | trimmed).all()), "an entry is neither kept nor trimmed"
    assert bool(kept[delta.abs() > cutoff].all()) and bool(trimmed[delta.abs() < cutoff].all())
    assert int(kept.sum()) == min(k, int((delta != 0).sum()))
    if density == 1.0:
        assert torch.equal(run("ties", MergeInputs("w", experts, origin=origin), density=1.0, lam=1.0), w)


@FAST
@given(copies(), st.floats(0, 0.95), st.floats(-2, 2), st.integers(0, 2**16))
def test_dare_with_the_seed_equal_to_the_experts_returns_the_seed(data, drop, lam, random_seed):
    """Every modality vector is zero, so nothing is left to drop or rescale."""
    experts, w, _ = data
    merged = run("dare", MergeInputs("w", experts, origin=w.clone()), drop=drop, lam=lam, random_seed=random_seed)
    assert torch.equal(merged, w)


@FAST
@given(copies(DYADIC), st.floats(0.05, 0.95), st.floats(0.1, 2), st.integers(0, 2**16))
def test_dare_on_copies_adds_whole_rescaled_copies_of_the_modality_vector(data, drop, lam, random_seed):
    """Each expert drops its own random entries, so copies are not idempotent for drop > 0: every
    entry is theta_0 + lam / (1 - p) * c * delta, c (the number of experts that kept it) in 0..N.
    With drop 0 and lam 1/N it is arithmetic's idempotent case."""
    experts, w, origin = data
    n = len(experts)
    merged = run("dare", MergeInputs("w", experts, origin=origin), drop=drop, lam=lam, random_seed=random_seed)
    delta = w - origin
    live = delta != 0
    counts = (merged - origin)[live] * (1 - drop) / (lam * delta[live])
    torch.testing.assert_close(counts, counts.round().clamp(0, n), rtol=0, atol=1e-6)
    assert torch.equal(merged[~live], origin[~live])
    torch.testing.assert_close(
        run("dare", MergeInputs("w", experts, origin=origin), drop=0.0, lam=1 / n), w, rtol=1e-9, atol=1e-9
    )


IDENTITY = {  # options under which copies of one expert merge back to it, given the number of experts n
    "dare_ties": lambda n: {"drop": 0.0, "lam": 1.0},
    "breadcrumbs": lambda n: {"density": 1.0, "lam": 1 / n},  # density 1: no outlier is dropped either
    "breadcrumbs_ties": lambda n: {"density": 1.0, "lam": 1.0},
    "della": lambda n: {"density": 1.0, "epsilon": 0.0, "lam": 1 / n},  # every keep probability 1
    "della_ties": lambda n: {"density": 1.0, "epsilon": 0.0, "lam": 1.0},
    "tsv": lambda n: {"share": 1.0, "lam": 1.0, "non_matrix": "mean"},  # every component; 1-D tensors averaged
    "model_stock": lambda n: {},  # equal vectors: cos 1, t = 1, their mean; zero vectors: t = 0, the seed
    "magmax": lambda n: {"lam": 1.0},  # every expert offers the same entry
    "karcher": lambda n: {"tol": 1e-300},  # one direction; a tiny tol so that no small copy counts as zero
    "sce": lambda n: {},  # equal weights, every sign agrees: the weighted mean of equal entries
}


COPIES_ELSEWHERE = {  # methods whose copies of one expert are checked by their own test above or below, and why
    "interpolation": "any ratio returns the copy",
    "arithmetic": "idempotent only at lam = 1/N",
    "regmean": "any nonsingular Gram matrices return the copy",
    "ties": "the trim keeps the top k",
    "dare": "whole rescaled copies of the vector",
    "iso_c": "not idempotent: the spectrum is flattened",
    "iso_cts": "not idempotent: the spectrum is flattened",
    "fisher": "without statistics the plain mean (tests/merging/test_merge_methods.py)",
    "regmean_pp": "RegMean on its sequential Gram matrices (tests/merging/test_merge_methods.py)",
    "slerp": "two experts only; any t returns the copy (tests/merging/test_model_stock_slerp.py)",
    "wudi": "a pseudo-inverse: the copy back within its condition number (tests/merging/test_round2_methods.py)",
}


def test_every_method_has_a_copies_of_one_expert_test():
    assert set(IDENTITY) | set(COPIES_ELSEWHERE) == set(MERGE_METHODS.names())


@pytest.mark.parametrize("method", sorted(IDENTITY))
@FAST
@given(copies())
def test_copies_of_one_expert_merge_back_to_it(method, data):
    """Only under the condition IDENTITY names: dropping, trimming or a share below 1 removes part of the vector."""
    experts, w, origin = data
    if method == "model_stock":  # mergekit floors the norm product at 1e-6: a tiny vector's cosine falls below 1
        size = float((w - origin).norm())
        assume(size == 0 or size**2 >= NORM_FLOOR)
    merged = run(method, MergeInputs("w", experts, origin=origin), **IDENTITY[method](len(experts)))
    torch.testing.assert_close(merged, w, rtol=1e-9, atol=1e-9 * (1 + float((w - origin).norm())))


def test_model_stock_on_tiny_vectors_moves_less_than_the_whole_way_as_mergekit_does():
    """A found case: vectors of norm 6e-5 have a norm product (4e-9) below the 1e-6 floor, so their cosine
    reads 0.004, not 1, and the merge stays near the seed."""
    origin = torch.tensor([6.1035e-05], dtype=torch.float64)
    experts = {V: torch.zeros(1, dtype=torch.float64), L: torch.zeros(1, dtype=torch.float64)}
    cos = float(origin.norm() ** 2) / NORM_FLOOR
    t = 2 * cos / (1 + cos)
    merged = run("model_stock", MergeInputs("w", experts, origin=origin))
    torch.testing.assert_close(merged, (1 - t) * origin, rtol=1e-12, atol=0)


@FAST
@given(copies(DYADIC), st.floats(0.05, 0.95), st.floats(0.1, 2), st.integers(0, 2**16))
def test_dare_ties_on_copies_keeps_or_drops_each_entry_whole(data, drop, lam, random_seed):
    """Copies agree on every sign, so TIES' mean over the experts that kept an entry is delta / (1 - p), or 0 if none did."""
    experts, w, origin = data
    merged = run("dare_ties", MergeInputs("w", experts, origin=origin), drop=drop, lam=lam, random_seed=random_seed)
    kept = origin + lam * (w - origin) / (1 - drop)
    close = torch.isclose(merged, kept, rtol=1e-12, atol=1e-12) | (merged == origin)
    assert bool(close.all())


def best_rank_k_error(vector: torch.Tensor, k: int) -> tuple[np.ndarray, float]:
    """Eckart-Young: the top-k singular values and the squared residual of any best rank-k approximation."""
    s = np.linalg.svd(vector.numpy(), compute_uv=False)
    return s[:k], float((s[k:] ** 2).sum())


@FAST
@given(copies(linear=True), st.floats(0.1, 2))
def test_tsv_on_copies_is_a_best_rank_k_approximation_of_the_one_vector(data, lam):
    """The same top-k components stacked n times collapse back to them, k = floor(min(out, in) / n): whatever
    ties among the singular values, the result has the top-k spectrum and the Eckart-Young residual."""
    experts, w, origin = data
    merged = run("tsv", MergeInputs("w", experts, origin=origin), lam=lam)
    delta, approximation = w - origin, (merged - origin) / lam
    k = max(1, min(w.shape) // len(experts))
    top, residual = best_rank_k_error(delta, k)
    scale = 1 + float(delta.norm())
    got = np.linalg.svd(approximation.numpy(), compute_uv=False)[:k]
    np.testing.assert_allclose(got, top, rtol=1e-7, atol=1e-8 * scale)
    assert float(((delta - approximation) ** 2).sum()) == pytest.approx(residual, rel=1e-6, abs=1e-8 * scale**2)


@FAST
@given(copies(linear=True), st.floats(0.1, 2))
def test_iso_c_on_copies_flattens_the_one_vectors_spectrum(data, lam):
    """Not idempotent: the sum n (w - theta_0) keeps its singular bases, each nonzero value becomes their mean."""
    experts, w, origin = data
    merged = run("iso_c", MergeInputs("w", experts, origin=origin), lam=lam)
    u, s, vt = np.linalg.svd((w - origin).numpy(), full_matrices=False)
    live = s > 1e-10 * s[0] if s[0] > 0 else np.zeros_like(s, dtype=bool)
    expected = len(experts) * (s[live].mean() if live.any() else 0.0) * u[:, live] @ vt[live]
    scale = 1 + float(np.abs(s).sum())
    np.testing.assert_allclose(((merged - origin) / lam).numpy(), expected, rtol=1e-8, atol=1e-9 * scale)


# --------------------------------------------------------------------------- symmetry
def relabel(mapping: dict, order: tuple) -> dict:
    """The same tensors under other modality labels: order[i] takes the i-th tensor."""
    return dict(zip(order, mapping.values()))


SYMMETRIC = {  # methods that treat every expert alike, with options drawn per example
    "arithmetic": lambda draw: {"lam": draw(DYADIC)},
    "ties": lambda draw: {"density": draw(DENSITIES), "lam": draw(DYADIC)},
    "regmean": lambda draw: {"alpha": draw(st.floats(0, 1))},
    "dare": lambda draw: {"drop": 0.0, "lam": draw(DYADIC)},  # drop > 0: masks are drawn per modality
    "dare_ties": lambda draw: {"drop": 0.0, "lam": draw(DYADIC)},  # likewise
    "breadcrumbs": lambda draw: {"density": draw(DENSITIES), "gamma": draw(GAMMAS), "lam": draw(DYADIC)},
    "breadcrumbs_ties": lambda draw: {"density": draw(DENSITIES), "gamma": draw(GAMMAS), "lam": draw(DYADIC)},
    "della": lambda draw: {"density": 1.0, "epsilon": 0.0, "lam": draw(DYADIC)},  # else random masks per modality
    "della_ties": lambda draw: {"density": 1.0, "epsilon": 0.0, "lam": draw(DYADIC)},  # likewise
    "tsv": lambda draw: {"share": draw(st.sampled_from([None, 0.25, 0.5, 1.0])), "lam": draw(DYADIC)},
    "iso_c": lambda draw: {"lam": draw(DYADIC)},
    "iso_cts": lambda draw: {"common_share": draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])), "lam": draw(DYADIC)},
    "model_stock": lambda draw: {"filter_wise": draw(st.booleans())},
    "wudi": lambda draw: {"lam": draw(DYADIC)},
    "karcher": lambda draw: {"tol": 1e-300},  # every step taken: a stop at tol could fall on another step
    "sce": lambda draw: {},  # select_topk 1: below it, variances summed in another order may rank ties otherwise
}
NOT_SYMMETRIC = {  # methods left out of SYMMETRIC, and why
    "interpolation": "weighs v and l by ratio and 1 - ratio (its mirror test follows)",
    "fisher": "weighs by the experts' Fisher, which these inputs lack",
    "regmean_pp": "RegMean's solve on a sequential Gram file; regmean covers the solve",
    "slerp": "t runs from the first expert to the second: swapping them maps t to 1 - t (its own test file)",
    "magmax": "of two entries of one magnitude the later expert's wins, so +d and -d depend on the order",
}
# A solve (the Gram-weighted methods) or SVDs (merging/svd.py): the same up to rounding, not bit for bit.
SOLVED = {
    name
    for name in MERGE_METHODS
    if MERGE_METHODS.get(name).statistics is Statistics.GRAMS or MERGE_METHODS.get(name).fn.__module__ == svd.__name__
} | {"model_stock", "karcher", "sce", "wudi"}  # sums in another order (cosines, tangents, weights) and an SVD


def test_every_method_is_either_symmetric_or_says_why_not():
    assert set(SYMMETRIC) | set(NOT_SYMMETRIC) == set(MERGE_METHODS.names())
    assert not set(SYMMETRIC) & set(NOT_SYMMETRIC)


@pytest.mark.parametrize("method", sorted(SYMMETRIC))
@FAST
@given(data=st.data())
def test_symmetric_methods_ignore_which_modality_holds_which_expert(method, data):
    """Dyadic values make the task-vector family exact in any summation order; RegMean solves and the SVD
    family decomposes (a permuted stack has the permuted polar factor), so they are close."""
    experts, origin = data.draw(expert_sets(DYADIC, linear=True))
    options = SYMMETRIC[method](data.draw)
    grams = spd_grams(experts, origin.shape[1], data.draw(st.integers(0, 2**16)))
    merged = run(method, MergeInputs("w", experts, origin=origin, grams=grams), **options)
    for order in permutations(experts):
        relabeled = MergeInputs("w", relabel(experts, order), origin=origin, grams=relabel(grams, order))
        if method in SOLVED:
            torch.testing.assert_close(run(method, relabeled, **options), merged, rtol=1e-8, atol=1e-8)
        else:
            assert torch.equal(run(method, relabeled, **options), merged), order


@FAST
@given(expert_sets(), st.floats(0, 1))
def test_interpolation_swapping_v_and_l_mirrors_the_ratio(data, ratio):
    """Interpolation weighs v and l differently, so only the swap with r -> 1 - r is symmetric; at 0.5 exactly."""
    experts, _ = data
    swapped = {**experts, V: experts[L], L: experts[V]}
    mirrored = run("interpolation", MergeInputs("w", swapped), ratio=1 - ratio)
    torch.testing.assert_close(
        mirrored, run("interpolation", MergeInputs("w", experts), ratio=ratio), rtol=1e-9, atol=1e-9
    )
    if len(experts) == 2:
        assert torch.equal(
            run("interpolation", MergeInputs("w", swapped), ratio=0.5),
            run("interpolation", MergeInputs("w", experts), ratio=0.5),
        )


RANDOM_MASKS = {  # options of the methods that draw a mask per (tensor, modality)
    "dare": lambda draw: {"drop": draw(st.floats(0.05, 0.95))},
    "dare_ties": lambda draw: {"drop": draw(st.floats(0.05, 0.95))},
    "della": lambda draw: {"density": draw(st.floats(0.3, 0.7)), "epsilon": draw(st.floats(0.0, 0.25))},
    "della_ties": lambda draw: {"density": draw(st.floats(0.3, 0.7)), "epsilon": draw(st.floats(0.0, 0.25))},
}


def test_random_masks_cover_every_method_with_a_random_seed():
    """A method that takes a random_seed draws masks: each needs its own options drawn above."""
    seeded = {name for name in MERGE_METHODS if "random_seed" in MERGE_METHODS.get(name).options.model_fields}
    assert set(RANDOM_MASKS) == seeded


@pytest.mark.parametrize("method", sorted(RANDOM_MASKS))
@FAST
@given(data=st.data())
def test_random_masks_do_not_depend_on_the_order_experts_arrive_in(method, data):
    """Relabelling changes the masks (they are seeded by modality), arriving in another order does not."""
    experts, origin = data.draw(expert_sets())
    options = {**RANDOM_MASKS[method](data.draw), "random_seed": data.draw(st.integers(0, 2**16))}
    reordered = dict(reversed(experts.items()))
    merged = run(method, MergeInputs("w", experts, origin=origin), **options)
    reordered_merge = run(method, MergeInputs("w", reordered, origin=origin), **options)
    torch.testing.assert_close(reordered_merge, merged, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- end points
@FAST
@given(expert_sets())
def test_interpolation_end_points(data):
    """Two experts: ratio 1 is v and ratio 0 is l, exactly. Three: the end points keep a third of vl."""
    experts, _ = data
    at_one = run("interpolation", MergeInputs("w", experts), ratio=1.0)
    at_zero = run("interpolation", MergeInputs("w", experts), ratio=0.0)
    if len(experts) == 2:
        assert torch.equal(at_one, experts[V]) and torch.equal(at_zero, experts[L])
    else:
        torch.testing.assert_close(at_one, (2 * experts[V] + experts[VL]) / 3, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(at_zero, (2 * experts[L] + experts[VL]) / 3, rtol=1e-12, atol=1e-12)


@FAST
@given(expert_sets())
def test_arithmetic_with_lambda_zero_is_the_seed(data):
    experts, origin = data
    assert torch.equal(run("arithmetic", MergeInputs("w", experts, origin=origin), lam=0.0), origin)


@pytest.mark.parametrize("method", MERGE_METHODS.names())
@FAST
@given(data=st.data())
def test_every_method_is_finite_on_random_inputs(method, data):
    """Default options, any shape (a 1-D tensor takes each method's non-matrix path), zeros and all."""
    experts, origin = data.draw(expert_sets(linear=data.draw(st.booleans())))
    most = MERGE_METHODS.get(method).max_experts
    experts = dict(list(experts.items())[:most])  # slerp takes two: v and l of a three-expert set
    grams = spd_grams(experts, origin.shape[1], data.draw(st.integers(0, 2**16))) if origin.ndim == 2 else None
    merged = run(method, MergeInputs("w", experts, origin=origin, grams=grams))
    assert merged.shape == origin.shape and bool(torch.isfinite(merged).all())


def gaussian_experts(shape: tuple[int, int], modalities, seed: int) -> tuple[dict, torch.Tensor]:
    """Experts in general position (almost surely): every SVD of the family has full rank."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return {m: draw() for m in modalities}, draw()


ISOTROPIC = ["iso_c", "iso_cts"]


def test_the_svd_family_is_tsv_and_the_isotropic_methods():
    assert {n for n in MERGE_METHODS if MERGE_METHODS.get(n).fn.__module__ == svd.__name__} == {"tsv", *ISOTROPIC}


@pytest.mark.parametrize("method", ISOTROPIC)
@FAST
@given(st.tuples(st.integers(1, 8), st.integers(1, 8)), MODALITY_SETS, st.integers(0, 2**16), st.floats(0.1, 2))
def test_isotropic_methods_give_every_direction_one_singular_value(method, shape, modalities, seed, lam):
    """Experts in general position: (merged - theta_0) / lam has full rank min(out, in), one value throughout."""
    experts, origin = gaussian_experts(shape, modalities, seed)
    s = np.linalg.svd(((run(method, MergeInputs("w", experts, origin=origin), lam=lam) - origin) / lam).numpy())[1]
    np.testing.assert_allclose(s, np.full(min(shape), s.mean()), rtol=1e-8)


@FAST
@given(st.tuples(st.integers(1, 8), st.integers(1, 8)), MODALITY_SETS, st.integers(0, 2**16), st.floats(0.1, 2))
def test_iso_cts_with_only_the_common_subspace_is_iso_c(shape, modalities, seed, lam):
    experts, origin = gaussian_experts(shape, modalities, seed)
    inputs = MergeInputs("w", experts, origin=origin)
    torch.testing.assert_close(
        run("iso_cts", inputs, common_share=1.0, lam=lam), run("iso_c", inputs, lam=lam), rtol=1e-9, atol=1e-9
    )


# --------------------------------------------------------------------------- RegMean
@FAST
@given(expert_sets(linear=True), st.floats(0, 1), st.integers(0, 2**16))
def test_regmean_with_one_gram_for_all_experts_is_the_plain_average(data, alpha, seed):
    experts, _ = data
    gram = spd_grams([V], next(iter(experts.values())).shape[1], seed)[V]
    merged = run("regmean", MergeInputs("w", experts, grams={m: gram for m in experts}), alpha=alpha)
    torch.testing.assert_close(merged, sum(experts.values()) / len(experts), rtol=1e-8, atol=1e-8)


@FAST
@given(expert_sets(linear=True), st.floats(0, 1), st.integers(0, 2**16))
def test_regmean_is_the_gram_weighted_solve(data, alpha, seed):
    """W* (sum_m G~_m) = sum_m W_m G~_m, solved here with torch.linalg.solve on the transposed system."""
    experts, _ = data
    grams = spd_grams(experts, next(iter(experts.values())).shape[1], seed)
    merged = run("regmean", MergeInputs("w", experts, grams=grams), alpha=alpha)
    tilde = {m: shrunk(g, alpha) for m, g in grams.items()}
    weighted = sum(experts[m] @ tilde[m] for m in experts)
    expected = torch.linalg.solve(sum(tilde.values()).T, weighted.T).T
    torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-8)


@FAST
@given(expert_sets(linear=True), st.integers(0, 2**16))
def test_regmean_with_alpha_zero_keeps_every_entry_between_the_experts(data, seed):
    """alpha = 0 leaves diag(G): each input column is a positive-weighted average of the experts' columns."""
    experts, _ = data
    grams = spd_grams(experts, next(iter(experts.values())).shape[1], seed)
    merged = run("regmean", MergeInputs("w", experts, grams=grams), alpha=0.0)
    stacked = torch.stack(list(experts.values()))
    assert bool((merged >= stacked.min(0).values - 1e-9).all() and (merged <= stacked.max(0).values + 1e-9).all())


@FAST
@given(expert_sets(linear=True), st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**16))
def test_regmean_alpha_only_scales_off_diagonal_terms(data, alpha, other_alpha, seed):
    """Diagonal Gram matrices have nothing off the diagonal to shrink: alpha makes no difference."""
    experts, _ = data
    grams = {
        m: torch.diag(torch.diag(g)) for m, g in spd_grams(experts, next(iter(experts.values())).shape[1], seed).items()
    }
    inputs = MergeInputs("w", experts, grams=grams)
    torch.testing.assert_close(
        run("regmean", inputs, alpha=alpha), run("regmean", inputs, alpha=other_alpha), rtol=1e-9, atol=1e-9
    )


@FAST
@given(expert_sets(linear=True), st.floats(0, 1), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_regmean_ignores_a_common_scale_of_the_grams(data, alpha, scale, seed):
    """Summed or per-token Gram matrices merge alike when every expert saw the same number of tokens."""
    experts, _ = data
    grams = spd_grams(experts, next(iter(experts.values())).shape[1], seed)
    scaled = {m: scale * g for m, g in grams.items()}
    torch.testing.assert_close(
        run("regmean", MergeInputs("w", experts, grams=scaled), alpha=alpha),
        run("regmean", MergeInputs("w", experts, grams=grams), alpha=alpha),
        rtol=1e-8,
        atol=1e-8,
    )


# --------------------------------------------------------------------------- TIES sign election
def ties_entry(values: list[float]) -> float:
    """One entry of untrimmed TIES: elect the sign of the total, average the experts that moved that way."""
    elected = math.copysign(1.0, sum(values)) if sum(values) != 0 else 0.0
    agreeing = [x for x in values if x != 0 and math.copysign(1.0, x) == elected]
    return sum(agreeing) / len(agreeing) if agreeing else 0.0


@FAST
@given(expert_sets(DYADIC), st.floats(0.1, 2))
def test_untrimmed_ties_elects_signs_by_mass_entry_by_entry(data, lam):
    """Dyadic values: the elected sign is exact, so an entry-by-entry reference can be matched."""
    experts, origin = data
    merged = run("ties", MergeInputs("w", experts, origin=origin), density=1.0, lam=lam)
    vectors = [(w - origin).flatten().tolist() for w in experts.values()]
    expected = torch.tensor([ties_entry(list(entry)) for entry in zip(*vectors)], dtype=torch.float64)
    torch.testing.assert_close(merged, origin + lam * expected.view_as(origin), rtol=1e-12, atol=1e-12)


@FAST
@given(expert_sets(DYADIC), DENSITIES, st.floats(0.1, 2))
def test_ties_of_exactly_opposite_vectors_cancels_to_the_seed(data, density, lam):
    """v and l move the seed by +d and -d: the elected sign is 0 everywhere, so nothing is added."""
    experts, origin = data
    delta = experts[V] - origin
    merged = run(
        "ties", MergeInputs("w", {V: origin + delta, L: origin - delta}, origin=origin), density=density, lam=lam
    )
    assert torch.equal(merged, origin)


# --------------------------------------------------------------------------- metrics: the report's aggregation
@st.composite
def checkpoints(draw, identical: bool = False):
    """A synthetic modality-specific state dict: v and l in every layer, vl in the last, random shapes."""
    layers = draw(st.integers(1, 2))
    state = {"pos_embed": torch.zeros(3)}
    for layer in range(layers):
        modalities = ["v", "l", "vl"] if layer == layers - 1 else ["v", "l"]
        for slot in ("attn.{m}.qkv.weight", "mlp.{m}.fc1.bias"):
            shape = draw(SHAPES)
            shared = tensor(draw, shape)
            for m in modalities:
                state[f"blocks.{layer}.{slot.format(m=m)}"] = shared.clone() if identical else tensor(draw, shape)
    return state


def independent_report(state: dict, names: list[str]) -> tuple[dict, dict, dict]:
    """Per merged tensor the mean over expert pairs; per layer and model, means weighted by entry count."""
    groups: dict[str, list[torch.Tensor]] = {}
    for key, value in state.items():
        if ".v." in key or ".l." in key or ".vl." in key:
            target = key.replace(".vl.", ".").replace(".v.", ".").replace(".l.", ".")
            groups.setdefault(target, []).append(value)
    per_tensor = {
        target: {n: float(np.mean([metric_fn(n)(x, y) for x, y in combinations(ts, 2)])) for n in names}
        for target, ts in groups.items()
    }

    def weighted(targets):
        total = sum(groups[t][0].numel() for t in targets)
        return {n: sum(per_tensor[t][n] * groups[t][0].numel() for t in targets) / total for n in names}

    layers = sorted({int(t.split(".")[1]) for t in groups})
    per_layer = {layer: weighted([t for t in groups if t.startswith(f"blocks.{layer}.")]) for layer in layers}
    return per_tensor, per_layer, weighted(list(groups))


@FAST
@given(checkpoints())
def test_mergeability_aggregates_pairs_by_mean_and_tensors_by_entry_count(state):
    report = mergeability(reader_from_state_dict(state))
    per_tensor, per_layer, model = independent_report(state, METRICS.names())
    assert sorted(row.target for row in report.tensors) == sorted(per_tensor)
    for row in report.tensors:
        assert row.values == pytest.approx(per_tensor[row.target], rel=1e-9, abs=1e-12), row.target
    assert sorted(report.per_layer) == sorted(per_layer)
    for layer, values in report.per_layer.items():
        assert values == pytest.approx(per_layer[layer], rel=1e-9, abs=1e-12), layer
    assert report.model == pytest.approx(model, rel=1e-9, abs=1e-12)
    assert 0 <= report.model["cosine"] <= 2 and 0 <= report.model["ssd"] <= 1 and 0 <= report.model["tssd"] <= 1


@FEWER
@given(checkpoints(identical=True))
def test_mergeability_of_identical_experts_is_zero_at_every_level(state):
    report = mergeability(reader_from_state_dict(state))
    levels = [row.values for row in report.tensors] + list(report.per_layer.values()) + [report.model]
    assert all(value == pytest.approx(0.0, abs=1e-12) for values in levels for value in values.values())


@FEWER
@given(checkpoints())
def test_mergeability_does_not_depend_on_which_expert_is_v_and_which_l(state):
    swapped = {}
    for key, value in state.items():
        key = key.replace(".v.", ".tmp.").replace(".l.", ".v.").replace(".tmp.", ".l.")
        swapped[key] = value
    assert mergeability(reader_from_state_dict(swapped)).model == pytest.approx(
        mergeability(reader_from_state_dict(state)).model, rel=1e-12, abs=1e-12
    )


@FEWER
@given(checkpoints())
def test_mergeability_against_a_reference_compares_the_differences(state):
    reference = {key: torch.full_like(value, 0.5) for key, value in state.items() if ".v." in key}
    reference = {key.replace(".v.", "."): value for key, value in reference.items()}
    relative = {
        key: value - 0.5 if any(f".{m}." in key for m in ("v", "l", "vl")) else value for key, value in state.items()
    }
    report = mergeability(reader_from_state_dict(state), reference=reader_from_state_dict(reference))
    assert report.relative_to_reference
    assert report.model == pytest.approx(mergeability(reader_from_state_dict(relative)).model, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- metrics: relations between them
@FAST
@given(SHAPES.flatmap(lambda shape: st.tuples(*[hnp.arrays(np.float64, shape, elements=REAL)] * 3)))
def test_l2_distance_obeys_the_triangle_inequality(arrays):
    x, y, z = (torch.from_numpy(a) for a in arrays)
    assert l2_distance(x, z) <= l2_distance(x, y) + l2_distance(y, z) + 1e-9


@FAST
@given(SHAPES.flatmap(lambda shape: st.tuples(*[hnp.arrays(np.float64, shape, elements=REAL)] * 2)))
def test_cosine_and_l2_agree_through_the_law_of_cosines(arrays):
    """||x - y||^2 = ||x||^2 + ||y||^2 - 2 ||x|| ||y|| cos: one metric predicts the other."""
    x, y = (torch.from_numpy(a) for a in arrays)
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0 or ny == 0:
        return
    cos = 1 - cosine_dissimilarity(x, y)
    assert l2_distance(x, y) ** 2 == pytest.approx(nx**2 + ny**2 - 2 * nx * ny * cos, rel=1e-9, abs=1e-9 * nx * ny)
