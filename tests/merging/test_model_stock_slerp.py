"""model_stock and slerp against their formulas re-derived here (numpy, float64) and against mergekit's own code."""

import math

import numpy as np
import pytest
import torch

from vlmerge.core.errors import MergeError
from vlmerge.core.modality import Modality
from vlmerge.merging import MERGE_METHODS, MergeInputs

V, L, VL = Modality.V, Modality.L, Modality.VL


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def model_stock_reference(origin: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    o = origin.ravel()
    taus = [w.ravel() - o for w in weights]
    k = len(taus)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cos = np.mean([taus[i] @ taus[j] / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j])) for i, j in pairs])
    t = k * cos / (1 + (k - 1) * cos)
    return (t * np.mean(weights, axis=0).ravel() + (1 - t) * o).reshape(origin.shape)


def slerp_reference(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x, y = a.ravel(), b.ravel()
    cos = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def correlated(modalities, shape=(6, 5), base_seed=0):
    """Experts sharing a common direction from the origin, so that their cosines are clearly positive."""
    origin, common = rand(*shape, seed=100), rand(*shape, seed=101)
    return origin, {m: origin + common + 0.7 * rand(*shape, seed=base_seed + i) for i, m in enumerate(modalities)}


# --------------------------------------------------------------------------- model_stock
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_model_stock_follows_its_formula(modalities):
    origin, experts = correlated(modalities)
    merged = run("model_stock", MergeInputs("w", experts, origin=origin))
    expected = model_stock_reference(origin.numpy(), [w.numpy() for w in experts.values()])
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_model_stock_matches_mergekit(filter_wise, shape):
    model_stock = pytest.importorskip("mergekit.merge_methods.model_stock")
    base = pytest.importorskip("mergekit.merge_methods.base")
    origin, experts = correlated((V, L, VL), shape=shape)
    group = base.TensorGroup(
        tuple(base.TensorEntry(f"m{i}", w, is_base=i == 0) for i, w in enumerate([origin, *experts.values()]))
    )
    theirs = model_stock.model_stock_merge_method.implementation(group, filter_wise=filter_wise)
    ours = run("model_stock", MergeInputs("w", experts, origin=origin), filter_wise=filter_wise)
    assert torch.equal(ours, theirs)


def test_model_stock_filter_wise_takes_one_ratio_per_row():
    origin, experts = correlated((V, L))
    merged = run("model_stock", MergeInputs("w", experts, origin=origin), filter_wise=True)
    for row in range(origin.shape[0]):
        expected = model_stock_reference(origin[row].numpy(), [w[row].numpy() for w in experts.values()])
        np.testing.assert_allclose(merged[row].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_model_stock_of_equal_experts_is_the_expert():
    origin, w = rand(6, 5, seed=1), rand(6, 5, seed=2)
    merged = run("model_stock", MergeInputs("w", {V: w, L: w.clone(), VL: w.clone()}, origin=origin))
    np.testing.assert_allclose(merged.numpy(), w.numpy(), rtol=1e-12, atol=1e-12)


def test_model_stock_of_orthogonal_vectors_is_the_seed():
    origin = rand(2, 2, seed=3)
    experts = {V: origin + torch.tensor([[1.0, 0.0], [0.0, 0.0]]), L: origin + torch.tensor([[0.0, 2.0], [0.0, 0.0]])}
    assert torch.equal(run("model_stock", MergeInputs("w", experts, origin=origin)), origin)


def test_model_stock_zero_vector_and_singular_ratio_keep_the_seed():
    origin = rand(4, seed=4)
    zero = run("model_stock", MergeInputs("w", {V: origin.clone(), L: origin + 1.0}, origin=origin))
    assert torch.equal(zero, origin)  # a zero vector: cosine 0, t = 0
    opposite = run("model_stock", MergeInputs("w", {V: origin + 1.0, L: origin - 1.0}, origin=origin))
    assert torch.equal(opposite, origin)  # cos = -1: 1 + cos = 0, no finite ratio, the seed


def test_model_stock_does_not_clamp_negative_cosines():
    origin = torch.zeros(2, dtype=torch.float64)
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-0.5, math.sqrt(3) / 2], dtype=torch.float64)
    merged = run("model_stock", MergeInputs("w", {V: a, L: b}, origin=origin))  # cos = -1/2: t = -1/0.5 = -2
    np.testing.assert_allclose(merged.numpy(), (-2 * (a + b) / 2).numpy(), rtol=1e-12)


def test_model_stock_refuses_one_expert():
    with pytest.raises(MergeError, match="w.*at least two experts"):
        run("model_stock", MergeInputs("w", {V: rand(3, seed=1)}, origin=rand(3, seed=2)))


# --------------------------------------------------------------------------- slerp
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_follows_its_formula(t):
    a, b = rand(6, 5, seed=1), rand(6, 5, seed=2)
    merged = run("slerp", MergeInputs("w", {V: a, L: b}), t=t)
    np.testing.assert_allclose(merged.numpy(), slerp_reference(t, a.numpy(), b.numpy()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(t, dtype):
    theirs_module = pytest.importorskip("mergekit.merge_methods.slerp")
    a, b = rand(6, 5, seed=3).to(dtype), rand(6, 5, seed=4).to(dtype)
    near = a + 1e-3 * b  # nearly colinear: the linear branch
    for x, y in [(a, b), (a, near), (a, -a), (torch.zeros_like(a), b)]:
        ours = run("slerp", MergeInputs("w", {V: x, L: y}), t=t)
        batch_t = torch.tensor([t], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        theirs = theirs_module.slerp(batch_t, x.unsqueeze(0), y.unsqueeze(0))[0]
        assert ours.dtype == x.dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_slerp_endpoints_and_equal_experts():
    a, b = rand(6, 5, seed=5), rand(6, 5, seed=6)
    np.testing.assert_allclose(run("slerp", MergeInputs("w", {V: a, L: b}), t=0.0).numpy(), a.numpy(), atol=1e-12)
    np.testing.assert_allclose(run("slerp", MergeInputs("w", {V: a, L: b}), t=1.0).numpy(), b.numpy(), atol=1e-12)
    for t in (0.0, 0.4, 1.0):
        np.testing.assert_allclose(run("slerp", MergeInputs("w", {V: a, L: a.clone()}), t=t).numpy(), a.numpy())


def test_slerp_keeps_the_norm_of_equal_norm_experts():
    a, b = rand(40, seed=7), rand(40, seed=8)
    b = b * a.norm() / b.norm()
    assert math.isclose(float(run("slerp", MergeInputs("w", {V: a, L: b}), t=0.3).norm()), float(a.norm()))


@pytest.mark.parametrize("modalities", [(V,), (V, L, VL)])
def test_slerp_refuses_other_expert_counts(modalities):
    experts = {m: rand(3, seed=i) for i, m in enumerate(modalities)}
    with pytest.raises(MergeError, match=r"blocks\.0\.w: slerp takes exactly two experts"):
        run("slerp", MergeInputs("blocks.0.w", experts))
    assert MERGE_METHODS.get("slerp").max_experts == 2


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 1.0])
def test_slerp_with_swapped_experts_is_slerp_at_one_minus_t(t):
    a, b = rand(6, 5, seed=9), rand(6, 5, seed=10)
    swapped = run("slerp", MergeInputs("w", {V: b, L: a}), t=1 - t)
    torch.testing.assert_close(swapped, run("slerp", MergeInputs("w", {V: a, L: b}), t=t), rtol=1e-12, atol=1e-12)
