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
