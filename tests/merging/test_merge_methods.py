"""Each merge method against its closed form, computed independently (numpy, float64)."""

import numpy as np
import pytest
import torch

from vlmerge.core.errors import ConfigError, MergeError
from vlmerge.core.modality import Modality
from vlmerge.merging import MERGE_METHODS, MergeInputs, MergeWarning

V, L, VL = Modality.V, Modality.L, Modality.VL


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def experts(modalities=(V, L), shape=(5, 4)):
    return {m: rand(*shape, seed=i) for i, m in enumerate(modalities)}


def gram(n, rows, seed):
    x = rand(rows, n, seed=seed).double()
    return x.T @ x


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_interpolation_two_and_three_experts(ratio):
    two, three = experts(), experts((V, L, VL))
    np.testing.assert_allclose(
        run("interpolation", MergeInputs("w", two), ratio=ratio).numpy(),
        ratio * two[V].numpy() + (1 - ratio) * two[L].numpy(),
        rtol=1e-6,
    )
    expected = 2 / 3 * ratio * three[V].numpy() + 2 / 3 * (1 - ratio) * three[L].numpy() + three[VL].numpy() / 3
    np.testing.assert_allclose(
        run("interpolation", MergeInputs("w", three), ratio=ratio).numpy(), expected, rtol=1e-5, atol=1e-7
    )


def test_interpolation_ratio_one_returns_the_vision_expert():
    two = experts()
    assert torch.equal(run("interpolation", MergeInputs("w", two), ratio=1.0), two[V])


def test_arithmetic_follows_its_formula_without_touching_the_origin():
    three, origin = experts((V, L, VL)), rand(5, 4, seed=9)
    kept = origin.clone()
    merged = run("arithmetic", MergeInputs("w", three, origin=origin), lam=0.4)
    o = origin.numpy()
    expected = o + 0.4 * sum(three[m].numpy() - o for m in three)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(origin, kept)


def test_arithmetic_with_zero_lambda_returns_the_seed():
    origin = rand(5, 4, seed=9)
    assert torch.equal(run("arithmetic", MergeInputs("w", experts(), origin=origin), lam=0.0), origin)


def numpy_regmean(ws, gs, alpha):
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    return sum(w @ g for w, g in zip(ws, shrunk)) @ np.linalg.inv(sum(shrunk))


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_regmean_matches_its_closed_form(alpha, modalities):
    ws = experts(modalities, shape=(6, 4))
    gs = {m: gram(4, 20, seed=10 + i) for i, m in enumerate(modalities)}
    merged = run("regmean", MergeInputs("w", {m: w.double() for m, w in ws.items()}, grams=gs), alpha=alpha)
    expected = numpy_regmean([ws[m].double().numpy() for m in modalities], [gs[m].numpy() for m in modalities], alpha)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_regmean_with_alpha_zero_is_a_per_input_weighted_average():
    ws = experts(shape=(3, 4))
    gs = {V: gram(4, 10, 1), L: gram(4, 10, 2)}
    merged = run("regmean", MergeInputs("w", ws, grams=gs), alpha=0.0).double()
    dv, dl = torch.diagonal(gs[V]), torch.diagonal(gs[L])
    expected = (ws[V].double() * dv + ws[L].double() * dl) / (dv + dl)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_regmean_with_equal_grams_is_the_plain_average():
    ws, g = experts(shape=(3, 4)), gram(4, 10, 1)
    torch.testing.assert_close(run("regmean", MergeInputs("w", ws, grams={V: g, L: g})), (ws[V] + ws[L]) / 2)


def test_regmean_averages_tensors_without_grams():
    ws = experts(shape=(7,))
    torch.testing.assert_close(run("regmean", MergeInputs("b", ws, grams=None)), (ws[V] + ws[L]) / 2)


def test_regmean_falls_back_to_least_squares_for_a_singular_gram_and_says_so():
    ws = experts(shape=(3, 4))
    x = rand(2, 4, seed=3).double()  # rank 2 < 4: singular sum
    g = x.T @ x
    with pytest.warns(MergeWarning, match="singular"):
        merged = run("regmean", MergeInputs("w", {m: w.double() for m, w in ws.items()}, grams={V: g, L: g}))
    expected = ((ws[V] + ws[L]).double().numpy() @ g.numpy()) @ np.linalg.pinv(2 * g.numpy())
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-8)


def test_regmean_missing_gram_falls_back_to_the_average_and_says_so():
    ws = experts(shape=(3, 4))
    with pytest.warns(MergeWarning, match="no Gram matrix for expert"):
        merged = run("regmean", MergeInputs("w", ws, grams={V: gram(4, 9, 1), L: None}))
    torch.testing.assert_close(merged, (ws[V] + ws[L]) / 2)


def test_ties_on_a_hand_worked_example():
    origin = torch.zeros(5)
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
    l = torch.tensor([-1.0, 2.0, 0.2, 1.0, 3.0])
    # density 0.6 keeps 3 entries each: v -> [3, 0, 0, 2, -4], l -> [-1, 2, 0, 1, 3]
    # sums [2, 2, 0, 3, -1] elect signs [+, +, 0, +, -]; agreeing means: [3, 2, 0, 1.5, -4]
    merged = run("ties", MergeInputs("w", {V: v, L: l}, origin=origin), density=0.6, lam=1.0)
    torch.testing.assert_close(merged, torch.tensor([3.0, 2.0, 0.0, 1.5, -4.0]))
    shifted = run("ties", MergeInputs("w", {V: v + 1, L: l + 1}, origin=origin + 1), density=0.6, lam=0.5)
    torch.testing.assert_close(shifted, 1 + 0.5 * torch.tensor([3.0, 2.0, 0.0, 1.5, -4.0]))


def test_dare_without_drops_is_modality_arithmetic():
    ws, origin = experts(), rand(5, 4, seed=7)
    torch.testing.assert_close(
        run("dare", MergeInputs("w", ws, origin=origin), drop=0.0, lam=0.3),
        run("arithmetic", MergeInputs("w", ws, origin=origin), lam=0.3),
    )


def test_dare_drops_and_rescales_reproducibly():
    origin = torch.zeros(200, 50)
    ws = {V: torch.ones(200, 50), L: torch.zeros(200, 50)}
    inputs = MergeInputs("w", ws, origin=origin)
    merged = run("dare", inputs, drop=0.75, lam=1.0, random_seed=3)
    assert set(merged.unique().tolist()) <= {0.0, 4.0}  # kept entries rescaled by 1/(1-p)
    assert (merged > 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(merged, run("dare", inputs, drop=0.75, lam=1.0, random_seed=3))
    assert not torch.equal(merged, run("dare", inputs, drop=0.75, lam=1.0, random_seed=4))


# Settings under which each method must return identical experts unchanged.
IDEMPOTENT = {
    "interpolation": {"ratio": 0.3},
    "arithmetic": {"lam": 0.5},
    "regmean": {"alpha": 0.7},
    "ties": {"density": 1.0, "lam": 1.0},
    "dare": {"drop": 0.0, "lam": 0.5},
    "dare_ties": {"drop": 0.0, "lam": 1.0},
    "breadcrumbs": {"density": 1.0, "lam": 0.5},
    "breadcrumbs_ties": {"density": 1.0, "lam": 1.0},
    "della": {"density": 1.0, "epsilon": 0.0, "lam": 0.5},
    "della_ties": {"density": 1.0, "epsilon": 0.0, "lam": 1.0},
    "tsv": {"share": 1.0, "lam": 1.0},
    "fisher": {},  # without statistics: the plain mean (tests/test_data_aware_methods.py weighs by them)
    "regmean_pp": {"alpha": 0.7},
    "model_stock": {},  # equal vectors: cos 1, t = 1, the mean
    "slerp": {"t": 0.3},  # colinear: the linear branch, (1 - t) w + t w
    "wudi": {},  # (sum_m tau G_m)(sum_m G_m)^+ = tau on its own row space
    "magmax": {"lam": 1.0},
    "karcher": {},  # one direction, the mean norm of equal norms
    "sce": {},  # equal weights, every sign agrees
}
NOT_IDEMPOTENT = {  # methods that change copies of one expert whatever their options, and why
    "iso_c": "a flat spectrum changes any vector whose singular values differ",
    "iso_cts": "a flat spectrum changes any vector whose singular values differ",
}


def test_every_method_says_whether_it_returns_identical_experts():
    assert set(IDEMPOTENT) | set(NOT_IDEMPOTENT) == set(MERGE_METHODS.names())
    assert not set(IDEMPOTENT) & set(NOT_IDEMPOTENT)


@pytest.mark.parametrize("method", MERGE_METHODS.names())
def test_merging_identical_experts_returns_them(method):
    if method in NOT_IDEMPOTENT:
        pytest.skip(NOT_IDEMPOTENT[method])
    w, origin = rand(6, 4, seed=1), rand(6, 4, seed=2)
    g = {V: gram(4, 10, 1), L: gram(4, 10, 2)}
    merged = run(method, MergeInputs("w", {V: w, L: w.clone()}, origin=origin, grams=g), **IDEMPOTENT[method])
    torch.testing.assert_close(merged, w)


@pytest.mark.parametrize("method", MERGE_METHODS.names())
def test_methods_never_modify_their_inputs(method):
    ws, origin = experts(), rand(5, 4, seed=5)
    copies = {m: w.clone() for m, w in ws.items()}
    run(method, MergeInputs("w", ws, origin=origin, grams={V: gram(4, 9, 1), L: gram(4, 9, 2)}))
    assert all(torch.equal(ws[m], copies[m]) for m in ws)


def test_options_are_validated_by_each_method():
    with pytest.raises(ConfigError, match="ratio"):
        MERGE_METHODS.get("interpolation").options.parse({"ratio": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'lam'"):
        MERGE_METHODS.get("arithmetic").options.parse({"lamb": 1.0})
    with pytest.raises(ConfigError, match="unknown merge method 'regmen'; did you mean 'regmean'"):
        MERGE_METHODS.get("regmen")
    with pytest.raises(MergeError, match="interpolation is defined"):
        run("interpolation", MergeInputs("w", {V: torch.ones(2), VL: torch.ones(2)}))


def numpy_ties_global(vectors: dict, density: float) -> dict:
    """Original TIES: one top-k cut-off per modality over all tensors, then elect and disjoint-mean."""
    cutoffs = {}
    for m in (V, L):
        flat = np.sort(np.concatenate([np.abs(v[m]).ravel() for v in vectors.values()]))[::-1]
        cutoffs[m] = flat[int(np.ceil(density * flat.size)) - 1]
    merged = {}
    for key, v in vectors.items():
        trimmed = np.stack([np.where(np.abs(v[m]) >= cutoffs[m], v[m], 0.0) for m in (V, L)])
        sign = np.sign(trimmed.sum(0))
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        merged[key] = np.where(agree, trimmed, 0).sum(0) / np.maximum(agree.sum(0), 1)
    return merged


def test_global_ties_trims_over_the_whole_model():
    from vlmerge.merging import merge_state_dict

    big = {m: 10 * rand(8, 4, seed=i) for i, m in enumerate((V, L))}
    small = {m: 0.1 * rand(8, 4, seed=5 + i) for i, m in enumerate((V, L))}
    state = {f"blocks.0.mlp.{m.value}.fc1.weight": big[m] for m in (V, L)}
    state |= {f"blocks.0.mlp.{m.value}.fc2.weight": small[m] for m in (V, L)}
    seed = {"blocks.0.mlp.fc1.weight": torch.zeros(8, 4), "blocks.0.mlp.fc2.weight": torch.zeros(8, 4)}
    merged = merge_state_dict(state, "ties", {"density": 0.3, "scope": "global"}, seed_state=seed)
    expected = numpy_ties_global(
        {"fc1": {m: big[m].numpy() for m in big}, "fc2": {m: small[m].numpy() for m in small}}, 0.3
    )
    np.testing.assert_allclose(merged.tensors["blocks.0.mlp.fc1.weight"].numpy(), expected["fc1"], rtol=1e-6)
    assert torch.count_nonzero(merged.tensors["blocks.0.mlp.fc2.weight"]) == 0  # all below the global cut-off
    per_tensor = merge_state_dict(state, "ties", {"density": 0.3}, seed_state=seed)
    assert torch.count_nonzero(per_tensor.tensors["blocks.0.mlp.fc2.weight"]) > 0
    assert set(merged.prepared.thresholds) == {V, L} and "thresholds" not in merged.options


def test_global_ties_without_its_pre_pass_is_an_error_not_a_per_tensor_trim():
    inputs = MergeInputs("w", experts(), origin=rand(5, 4, seed=3))
    with pytest.raises(MergeError, match="scope=global needs the cut-offs of its pre-pass"):
        run("ties", inputs, scope="global")
    cutoffs = MERGE_METHODS.get("ties").prepare([inputs], MERGE_METHODS.get("ties").options.parse({"scope": "global"}))
    prepared = MergeInputs(inputs.target, inputs.experts, inputs.origin, prepared=cutoffs)
    torch.testing.assert_close(run("ties", prepared, scope="global"), run("ties", inputs))  # one tensor: the same trim
