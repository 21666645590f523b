"""The fast paths of the task-vector sparsifications give what their straightforward definitions give.

`magnitude_order` sorts the magnitudes' bits as integers instead of the floats; breadcrumbs and
DELLA rank by it instead of a float sort and a near-full top-k; TIES' trim takes its top-k unsorted.
Each is checked here against the definition written out independently (numpy's stable sort), and
against the code it replaced (kept below, verbatim; the old trim is test_task_vectors'
reference copy) on random tensors, bit for bit.
"""

import math

import numpy as np
import pytest
import torch
from test_task_vectors import old_trim_to_top_k

from vlmerge.core.modality import Modality
from vlmerge.merging.task_vectors import (
    breadcrumbs,
    della_keep_probabilities,
    kept_count,
    magnitude_order,
    trim_to_top_k,
)

V = Modality.V
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tensor(kind: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """`random`: distinct magnitudes (almost surely); `ties`: a few values, both signs, signed zeros."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    values = torch.randint(-3, 4, shape, generator=generator).to(dtype) * 0.5
    return torch.where(torch.rand(shape, generator=generator) < 0.1, torch.tensor(-0.0, dtype=dtype), values)


def numpy_order(vector: torch.Tensor) -> np.ndarray:
    """Positions by magnitude, smallest first, equal magnitudes by position."""
    return np.argsort(np.abs(vector.double().flatten().numpy()), kind="stable")


# --------------------------------------------------------------------------- the replaced code, verbatim
def old_della_keep_probabilities(vector: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    numel = vector.numel()
    if numel == 1:
        return torch.full(vector.shape, density, dtype=torch.float64)
    order = vector.abs().flatten().argsort(stable=True)
    ranks = torch.empty(numel, dtype=torch.float64)
    ranks[order] = torch.arange(numel, dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * ranks / (numel - 1)).view(vector.shape)


def old_breadcrumbs(vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    numel = vector.numel()
    keep = min(kept_count(numel, density), numel)
    outliers = min(int(gamma * numel + 1e-9), numel - keep)
    flat = vector.flatten()
    kept = flat.abs().topk(outliers + keep).indices[outliers:]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[kept] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(vector)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_magnitude_order_is_the_stable_order_of_the_magnitudes(dtype, kind):
    for seed, shape in enumerate([(1,), (7,), (31, 9), (4, 5, 6), (3000,)]):
        vector = tensor(kind, shape, seed, dtype)
        np.testing.assert_array_equal(magnitude_order(vector).numpy(), numpy_order(vector))
        assert torch.equal(magnitude_order(vector), vector.abs().flatten().argsort(stable=True))


def test_magnitude_order_puts_subnormals_zeros_and_infinities_where_floats_go():
    vector = torch.tensor([float("inf"), -1e-45, 0.0, -0.0, 1e-38, -float("inf"), 3.0, 1e-45])
    np.testing.assert_array_equal(magnitude_order(vector).numpy(), [2, 3, 1, 7, 4, 6, 0, 5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.3, 0.3), (0.95, 0.2), (0.6, 0.5)])
def test_breadcrumbs_keeps_the_ranks_between_the_outliers_and_the_smallest(dtype, kind, density, gamma):
    """Ranked by magnitude, equal magnitudes by position: keep ranks [n - outliers - keep, n - outliers)."""
    for seed, shape in enumerate([(40, 25), (333,)]):
        vector = tensor(kind, shape, seed, dtype)
        n = vector.numel()
        keep = max(1, math.ceil(density * n - 1e-9))
        outliers = min(int(gamma * n + 1e-9), n - keep)
        mask = np.zeros(n, dtype=bool)
        mask[numpy_order(vector)[n - outliers - keep : n - outliers]] = True
        expected = np.where(mask, vector.double().flatten().numpy(), 0.0).reshape(shape)
        got = breadcrumbs(density, gamma)(V, vector)
        assert got.dtype == dtype and got.shape == vector.shape
        np.testing.assert_array_equal(got.double().numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.2, 0.05)])
def test_breadcrumbs_gives_what_its_top_k_version_gave_on_distinct_magnitudes(dtype, density, gamma):
    for seed in range(3):
        vector = tensor("random", (96, 64), seed, dtype)
        assert torch.equal(breadcrumbs(density, gamma)(V, vector), old_breadcrumbs(vector, density, gamma))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_della_keep_probabilities_are_bit_for_bit_those_of_the_float_sort(dtype, kind):
    for seed, shape in enumerate([(1,), (2,), (17, 3), (64, 48)]):
        vector = tensor(kind, shape, seed, dtype)
        for density, epsilon in [(0.5, 0.15), (0.6, 0.2), (0.3, 0.0)]:
            new = della_keep_probabilities(vector, density, epsilon)
            assert torch.equal(new, old_della_keep_probabilities(vector, density, epsilon))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("density", [0.01, 0.07, 0.2, 0.5, 0.99])
def test_the_unsorted_top_k_trims_the_same_entries(dtype, kind, density):
    """topk picks its k entries before it sorts them: sorted or not, the same set, ties included."""
    for seed, shape in enumerate([(50, 40), (4097,)]):
        vector = tensor(kind, shape, seed, dtype)
        assert torch.equal(trim_to_top_k(vector, density), old_trim_to_top_k(vector, density))
