"""The task-vector sparsifiers against mergekit 0.1.5's own (`mergekit/sparsify.py`, torch alone).

Where the two define a step alike the outputs are equal: TIES' magnitude trim and breadcrumbs'
outlier-and-trim masks on tensors whose kept counts are whole numbers (mergekit floors
density x n, vlmerge takes the ceiling) and whose magnitudes are distinct (the two break ties
differently), and DELLA's keep probabilities on a single row (mergekit ranks each row, vlmerge
the whole tensor). mergekit installs with --no-deps beside the pinned torch (the Makefile does);
under CI its absence is a failure, elsewhere a skip.
"""

import os

import pytest
import torch

from vlmerge.core.modality import Modality
from vlmerge.merging.task_vectors import breadcrumbs, della_keep_probabilities, magnitude

try:
    from mergekit import sparsify as mergekit_sparsify
except ImportError as error:  # pragma: no cover - depends on the environment
    if os.environ.get("CI"):
        raise ImportError(f"mergekit is not installed ({error}); CI installs mergekit==0.1.5 --no-deps") from error
    pytest.skip(f"mergekit not installed ({error})", allow_module_level=True)

V = Modality.V


def distinct_magnitudes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random signs on a random permutation of 1..n, scaled: no two magnitudes are equal."""
    generator = torch.Generator().manual_seed(seed)
    numel = int(torch.Size(shape).numel())
    magnitudes = (torch.randperm(numel, generator=generator).double() + 1) / numel
    signs = torch.randint(0, 2, (numel,), generator=generator).double() * 2 - 1
    return (magnitudes * signs).view(shape).float()


@pytest.mark.parametrize("shape", [(64,), (8, 16), (4, 5, 10)])
@pytest.mark.parametrize("density", [0.125, 0.25, 0.5, 0.75])
def test_the_magnitude_trim_equals_mergekits(shape, density):
    vector = distinct_magnitudes(shape, seed=len(shape))
    ours = magnitude(density)(V, vector)
    theirs = mergekit_sparsify.magnitude(vector, density)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(100,), (10, 20)])
@pytest.mark.parametrize("density, gamma", [(0.9, 0.01), (0.5, 0.1), (0.2, 0.05), (0.7, 0.0)])
def test_breadcrumbs_equals_mergekits_magnitude_outliers(shape, density, gamma):
    vector = distinct_magnitudes(shape, seed=7)
    ours = breadcrumbs(density, gamma)(V, vector)
    theirs = mergekit_sparsify.magnitude_outliers(vector, density, gamma=gamma)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("numel", [2, 17, 256])
@pytest.mark.parametrize("density, epsilon", [(0.5, 0.15), (0.3, 0.1), (0.8, 0.05)])
def test_della_keep_probabilities_equal_mergekits_on_one_row(numel, density, epsilon, monkeypatch):
    """mergekit draws its mask with torch.bernoulli(probs): the probabilities it passes are captured."""
    vector = distinct_magnitudes((1, numel), seed=numel)
    captured = {}

    def capture(probabilities, *args, **kwargs):
        captured["probabilities"] = probabilities.clone()
        return torch.ones_like(probabilities)

    monkeypatch.setattr(mergekit_sparsify.torch, "bernoulli", capture)
    mergekit_sparsify.della_magprune(vector, density, epsilon)
    ours = della_keep_probabilities(vector, density, epsilon)
    torch.testing.assert_close(ours.float(), captured["probabilities"], rtol=0, atol=1e-7)
