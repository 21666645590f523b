"""The SVD family's fast paths (Gram eigendecompositions, polar factors of stacked orthonormal blocks)
against its exact path (a full SVD of every matrix, as FusionBench computes): the same merges to rounding,
the fast path taken wherever the kept singular values are resolved, the exact one where they are not."""

import pytest
import torch

from vlmerge.core.modality import Modality
from vlmerge.merging import MERGE_METHODS, MergeInputs, svd

V, L, VL = Modality.V, Modality.L, Modality.VL
METHODS = ["tsv", "iso_c", "iso_cts"]


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def with_spectrum(shape: tuple[int, int], values: torch.Tensor, seed: int) -> torch.Tensor:
    """A random matrix with the given singular values (len = min(shape))."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(values), generator=g, dtype=torch.float64))
    return (u * values) @ v.mT


def experts(modalities, shape, spectrum: str, seed: int = 0) -> MergeInputs:
    rank = min(shape)
    origin = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64)
    ws = {}
    for i, m in enumerate(modalities):
        if spectrum == "gaussian":
            tau = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
        else:  # geometric, from 1 down to 1e-3 ("decaying") or 1e-7 ("unresolved": below the fast path's reach)
            low = {"decaying": -3.0, "unresolved": -7.0}[spectrum]
            tau = with_spectrum(shape, torch.logspace(0.0, low, rank, dtype=torch.float64), seed + i)
        ws[m] = origin + tau
    return MergeInputs("w", ws, origin=origin)


def exact(method: str, inputs: MergeInputs, monkeypatch) -> torch.Tensor:
    """The method with every fast path refused: each check of resolved values fails."""
    with monkeypatch.context() as patch:
        patch.setattr(svd, "RESOLVED", float("inf"))
        return run(method, inputs)


SHAPES = [(40, 24), (24, 40), (30, 30)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spectrum", ["gaussian", "decaying", "unresolved"])
def test_fast_and_exact_paths_agree(method, modalities, shape, spectrum, monkeypatch):
    """To 1e-7 of the merged vector: a Gram matrix resolves its eigenvalues to about 1e-16 of the largest,
    and the fast path is taken only where the kept ones are above 1e-8 of it."""
    inputs = experts(modalities, shape, spectrum)
    fast, reference = run(method, inputs), exact(method, inputs, monkeypatch)
    delta, expected = fast - inputs.origin, reference - inputs.origin
    assert float((delta - expected).abs().max()) <= 1e-7 * float(expected.abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_resolved_inputs_never_take_a_full_svd(method, modalities, shape, monkeypatch):
    """Well-conditioned vectors (random, 40 x 24) are decomposed through their Gram matrices only."""

    def refuse(matrix, target):
        raise AssertionError(f"full SVD of a {list(matrix.shape)} matrix")

    monkeypatch.setattr(svd, "exact_components", refuse)
    run(method, experts(modalities, shape, "gaussian"))


@pytest.mark.parametrize("method, options", [("iso_c", {}), ("tsv", {"share": 1.0})])
def test_unresolved_inputs_take_the_full_svd(method, options, monkeypatch):
    """Singular values down to 1e-7 of the largest, all of them kept: the Gram matrix cannot resolve them,
    the SVD is taken."""
    calls = []
    original = svd.exact_components
    monkeypatch.setattr(svd, "exact_components", lambda m, t: calls.append(m.shape) or original(m, t))
    run(method, experts((V, L), (40, 24), "unresolved"), **options)
    assert calls


def test_identical_experts_fall_back_and_keep_their_rank(monkeypatch):
    """Copies stack the same directions twice: the two-block polar factor is unresolved, the stack is
    orthogonalised on its range by the SVD, and TSV returns the best rank-k approximation."""
    inputs = experts((V,), (20, 12), "gaussian")
    copies = MergeInputs("w", {V: inputs.experts[V], L: inputs.experts[V].clone()}, origin=inputs.origin)
    u, s, vh = torch.linalg.svd(inputs.experts[V] - inputs.origin, full_matrices=False)
    expected = (u[:, :6] * s[:6]) @ vh[:6]
    torch.testing.assert_close(run("tsv", copies) - inputs.origin, expected, rtol=1e-9, atol=1e-10)


def bases_at_angles(d: int, k: int, angles: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal (d, k) bases whose first len(angles) principal angles are `angles`, the rest 90 degrees."""
    g = torch.Generator().manual_seed(seed)
    frame, _ = torch.linalg.qr(torch.randn(d, 2 * k, generator=g, dtype=torch.float64))
    b, other = frame[:, :k], frame[:, k:]
    q = other.clone()
    n = len(angles)
    q[:, :n] = b[:, :n] * angles.cos() + other[:, :n] * angles.sin()
    mix, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))  # no pair lies on the axes
    return b @ mix, q @ mix.mT


@pytest.mark.parametrize(
    "angles",
    [
        torch.tensor([1e-5, 1.2e-5, 1.4e-5, 2e-5]),  # a cluster whose cosines agree to 1e-10
        torch.tensor([1e-3, 0.3, 0.785, 0.786, 1.2]),  # both sides of 45 degrees, two of them at it
        torch.logspace(-5, 0, 12, dtype=torch.float64),
    ],
)
def test_the_polar_factor_of_two_bases_matches_the_svd_at_small_angles(angles):
    """Cosines within 1e-10 of 1 and of each other leave their pairs unresolved; the sines resolve them."""
    b, q = bases_at_angles(40, 16, angles.double(), seed=len(angles))
    u, _, vh = torch.linalg.svd(torch.cat([b, q], dim=1), full_matrices=False)
    polar = svd.polar_of_two_orthonormal(b, q, "w")
    assert polar is not None
    torch.testing.assert_close(polar.matrix(), u @ vh, rtol=0, atol=1e-9)


def test_bases_sharing_a_direction_leave_the_polar_factor_to_the_svd():
    b, q = bases_at_angles(40, 16, torch.tensor([1e-8, 0.5], dtype=torch.float64), seed=0)
    assert svd.polar_of_two_orthonormal(b, q, "w") is None


def test_two_experts_of_half_the_rank_each_take_the_fast_path(monkeypatch):
    """TSV keeps n / 2 directions of each of two experts: on the square side the stacked bases meet at
    angles near 1 / n (here planted at 1e-5), still decomposed without the stack's own SVD or Gram matrix."""
    d, k = 60, 15
    g = torch.Generator().manual_seed(3)
    left_b, left_q = bases_at_angles(d, k, torch.tensor([0.4, 0.9], dtype=torch.float64), seed=1)
    right_b, right_q = bases_at_angles(2 * k, k, torch.tensor([1e-5, 2e-5, 0.3], dtype=torch.float64), seed=2)
    values = torch.logspace(0.0, -1.0, k, dtype=torch.float64)
    origin = torch.randn(d, 2 * k, generator=g, dtype=torch.float64)
    small = 1e-3 * values[-1] * torch.randn(d, 2 * k, generator=g, dtype=torch.float64)  # the other half, below
    inputs = MergeInputs(
        "w",
        {V: origin + (left_b * values) @ right_b.mT + small, L: origin + (left_q * values) @ right_q.mT - small},
        origin=origin,
    )
    reference = exact("tsv", inputs, monkeypatch)
    for slow in ("recombine", "exact_components"):
        monkeypatch.setattr(svd, slow, lambda *args, name=slow: pytest.fail(f"{name} called"))
    fast = run("tsv", inputs)
    delta, expected = fast - origin, reference - origin
    assert float((delta - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_iso_cts_keeps_its_fast_path_when_only_the_right_stack_is_unresolved(shape, monkeypatch):
    """Iso-CTS's task-specific and common right vectors fill the input space and meet at small angles in a
    base-size weight; their stack then takes its own SVD, not the whole exact path."""
    inputs = experts((V, L), shape, "gaussian")
    reference = exact("iso_cts", inputs, monkeypatch)
    monkeypatch.setattr(svd, "polar_beside_orthonormal", lambda *args: None)
    monkeypatch.setattr(svd, "recombine", lambda *args: pytest.fail("the whole exact path was taken"))
    delta, expected = run("iso_cts", inputs) - inputs.origin, reference - inputs.origin
    assert float((delta - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


def float32_experts(shape: tuple[int, int], count: int, seed: int) -> MergeInputs:
    g = torch.Generator().manual_seed(seed)
    origin = torch.randn(*shape, generator=g)
    return MergeInputs("w", {m: origin + 0.01 * torch.randn(*shape, generator=g) for m in (V, L, VL)[:count]}, origin)


@pytest.mark.parametrize("shape", [(300, 60), (60, 300)])
def test_iso_c_in_float32_stays_within_its_bound_of_the_float64_merge(shape, monkeypatch):
    """A tall sum of random vectors has squared singular values within 3x of each other: the float32 route is
    taken, and lands within 4e-6 of the float64 merge (max |error| / max |merged vector|)."""
    inputs = float32_experts(shape, 2, seed=5)
    exact = run("iso_c", inputs).double() - inputs.origin.double()
    dtypes = []
    original = svd.gram_eigh
    monkeypatch.setattr(svd, "gram_eigh", lambda a, target: dtypes.append(a.dtype) or original(a, target))
    fast = run("iso_c", inputs, precision="float32").double() - inputs.origin.double()
    assert dtypes == [torch.float32]
    assert 0 < float((fast - exact).abs().max()) <= 4e-6 * float(exact.abs().max())


@pytest.mark.parametrize("count", [2, 3])
def test_iso_c_in_float32_leaves_an_ill_conditioned_sum_to_float64(count, monkeypatch):
    """A square sum has squared singular values down to about 1 / n^2 of the largest: after the float32 check it
    is merged as in float64, bit for bit."""
    inputs = float32_experts((60, 60), count, seed=6)
    exact = run("iso_c", inputs)
    dtypes = []
    original = svd.gram_eigh
    monkeypatch.setattr(svd, "gram_eigh", lambda a, target: dtypes.append(a.dtype) or original(a, target))
    assert torch.equal(run("iso_c", inputs, precision="float32"), exact)
    assert dtypes == [torch.float32, torch.float64]


def test_iso_c_in_float32_takes_the_full_svd_below_its_resolution():
    inputs = experts((V, L), (40, 24), "unresolved")
    assert torch.equal(run("iso_c", inputs, precision="float32"), run("iso_c", inputs))


def test_iso_c_in_float32_of_experts_equal_to_the_seed_is_the_seed():
    inputs = float32_experts((30, 10), 2, seed=7)
    copies = MergeInputs("w", {m: inputs.origin.clone() for m in inputs.experts}, inputs.origin)
    assert torch.equal(run("iso_c", copies, precision="float32"), inputs.origin)


def refuse_the_svd(monkeypatch) -> list:
    calls = []
    original = svd.exact_components
    monkeypatch.setattr(svd, "exact_components", lambda m, t: calls.append(m.shape) or original(m, t))
    return calls


BELOW_RESOLVED = {
    # singular values 1 to 10^-3.2 (Gram ratio 4e-7): the Gram route's factor is orthonormal to about 1e-11
    "spread": (torch.logspace(0.0, -3.2, 200, dtype=torch.float64), True),
    # one singular value alone at 3e-5 (ratio 9e-10): rounding piles onto it, orthonormal only to about 1e-7
    "isolated": (torch.cat([torch.ones(199, dtype=torch.float64), torch.tensor([3e-5], dtype=torch.float64)]), False),
}


@pytest.mark.parametrize("spectrum", sorted(BELOW_RESOLVED))
def test_a_polar_factor_below_resolved_comes_from_the_gram_matrix_where_it_checks_out(spectrum, monkeypatch):
    """Gram eigenvalues below RESOLVED but above CHECKED: the factor from the Gram matrix is taken where it is
    orthonormal to its bound, else the SVD's; either way it is the SVD's to 1e-9. Iso-C's flat spectrum the same."""
    values, checked = BELOW_RESOLVED[spectrum]
    tau = with_spectrum((200, 200), values, seed=1)
    gram_values = torch.linalg.eigvalsh(tau.mT @ tau)
    assert svd.CHECKED < float(gram_values[0] / gram_values[-1]) < svd.RESOLVED
    u, s, vh = torch.linalg.svd(tau)
    calls = refuse_the_svd(monkeypatch)
    torch.testing.assert_close(svd.polar_factor(tau, "w").matrix(), u @ vh, rtol=0, atol=1e-9)
    origin = torch.zeros_like(tau)
    merged = run("iso_c", MergeInputs("w", {V: tau, L: origin.clone()}, origin))
    torch.testing.assert_close(merged, (u * s.mean()) @ vh, rtol=0, atol=1e-9 * float(s.mean()))
    assert (not calls) == checked
