"""The task-vector family (merging/task_vectors.py) and its presets.

1. The presets `arithmetic`, `ties` (per tensor and global) and `dare` reproduce, bit for bit, the
   separate functions they replaced; those are kept below, verbatim, as the reference.
2. Each sparsification and consensus against its closed form, computed here independently
   (numpy, or torch with the drop generator rebuilt from its definition).
3. Properties over random inputs (hypothesis): no NaN, identical experts, expert permutations.
"""

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable
from itertools import permutations
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.merging import MERGE_METHODS, MergeInputs, merge_state_dict, methods, register_method, unregister_method
from vlmerge.merging.methods import LAM_TIES
from vlmerge.merging.task_vectors import (
    breadcrumbs,
    consensus_sum,
    keep_all,
    magnitude,
    task_vector_merge,
    trim_to_top_k,
)
from vlmerge.models import VLTransformer

V, L, VL = Modality.V, Modality.L, Modality.VL
# The presets are the methods merging/methods.py registers on the seed's modality vectors (needs_origin);
# the other seed-based methods decompose them instead (merging/svd.py, tests/merging/test_svd_methods.py).
FAMILY = [
    name
    for name in MERGE_METHODS
    if MERGE_METHODS.get(name).needs_origin and MERGE_METHODS.get(name).fn.__module__ == methods.__name__
]
# TIES-consensus presets: their lam scales the one merged vector (a sum-consensus lam scales the summed ones).
TIES_CONSENSUS = [
    name for name in FAMILY if MERGE_METHODS.get(name).options.model_fields["lam"].description.startswith(LAM_TIES)
]
# Deterministic ones draw no random mask: nothing to seed.
DETERMINISTIC_TIES = [
    name for name in TIES_CONSENSUS if "random_seed" not in MERGE_METHODS.get(name).options.model_fields
]
FAST = settings(max_examples=40, deadline=None)


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_inputs(modalities, shape, seed, dtype=torch.float32, target="w") -> MergeInputs:
    experts = {m: rand(*shape, seed=seed + i, dtype=dtype) for i, m in enumerate(modalities)}
    return MergeInputs(target, experts, origin=rand(*shape, seed=seed + 10, dtype=dtype))


def uniforms(random_seed: int, target: str, modality: Modality, shape) -> torch.Tensor:
    """The drop masks' uniforms, rebuilt from their definition: sha256 of 'seed:target:modality'."""
    digest = hashlib.sha256(f"{random_seed}:{target}:{modality.value}".encode()).digest()
    return torch.rand(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))


# --------------------------------------------------------------------------- 1. the replaced functions, verbatim
class OldArithmeticOptions(StrictConfig):
    lam: float = Field(0.5, description="scale of the summed modality vectors")


def old_arithmetic(inputs: MergeInputs, options: OldArithmeticOptions) -> torch.Tensor:
    return inputs.origin + options.lam * sum(inputs.modality_vectors().values())


class OldTiesOptions(StrictConfig):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each modality vector kept")
    lam: float = Field(1.0, description="scale of the merged modality vector")
    scope: Literal["tensor", "global"] = Field(
        "tensor", description="trim top-k per tensor (streams) or over the model"
    )


class OldTiesThresholds(StrictConfig):
    thresholds: dict[Modality, float]


def old_kept_count(numel: int, density: float) -> int:
    return max(1, math.ceil(density * numel - 1e-9))


def old_trim_to_top_k(vector: torch.Tensor, density: float) -> torch.Tensor:
    keep = old_kept_count(vector.numel(), density)
    if keep >= vector.numel():
        return vector.clone()
    flat = vector.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(vector)


def old_ties_global_thresholds(all_inputs: Iterable[MergeInputs], options: OldTiesOptions) -> OldTiesThresholds | None:
    if options.scope == "tensor":
        return None
    magnitudes: dict[Modality, list[torch.Tensor]] = defaultdict(list)
    for inputs in all_inputs:
        for modality, vector in inputs.modality_vectors().items():
            magnitudes[modality].append(vector.abs().flatten().float())
    thresholds = {}
    for modality, parts in magnitudes.items():
        values = torch.cat(parts)
        rank = values.numel() - old_kept_count(values.numel(), options.density) + 1
        thresholds[modality] = float(values.kthvalue(rank).values)
    return OldTiesThresholds(thresholds=thresholds)


def old_trim(vector, modality, density, cutoffs):
    if cutoffs is None:
        return old_trim_to_top_k(vector, density)
    return torch.where(vector.abs() >= cutoffs.thresholds[modality], vector, torch.zeros_like(vector))


def old_ties(inputs: MergeInputs, options: OldTiesOptions) -> torch.Tensor:
    trimmed = torch.stack(
        [old_trim(v, m, options.density, inputs.prepared) for m, v in inputs.modality_vectors().items()]
    )
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(dim=0).clamp(min=1)
    merged = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0) / count
    return inputs.origin + options.lam * merged


class OldDareOptions(StrictConfig):
    drop: float = Field(0.5, ge=0.0, lt=1.0, description="probability of dropping each entry")
    lam: float = Field(0.5, description="scale of the summed rescaled modality vectors")
    random_seed: int = Field(0, description="random seed of the drop masks")


def old_dare_generator(random_seed: int, target: str, modality: Modality) -> torch.Generator:
    digest = hashlib.sha256(f"{random_seed}:{target}:{modality.value}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def old_dare(inputs: MergeInputs, options: OldDareOptions) -> torch.Tensor:
    total = torch.zeros_like(inputs.origin)
    for modality, vector in inputs.modality_vectors().items():
        generator = old_dare_generator(options.random_seed, inputs.target, modality)
        keep = torch.rand(vector.shape, generator=generator) >= options.drop
        total = total + torch.where(keep, vector, torch.zeros_like(vector)) / (1.0 - options.drop)
    return inputs.origin + options.lam * total


OLD = {
    "arithmetic": (old_arithmetic, OldArithmeticOptions),
    "ties": (old_ties, OldTiesOptions),
    "dare": (old_dare, OldDareOptions),
}
CASES = [  # (modalities, shape, dtype)
    ((V, L), (7, 5), torch.float32),
    ((V, L, VL), (33,), torch.float32),
    ((V, L), (4, 3, 2), torch.float64),
    ((V, L, VL), (16, 8), torch.bfloat16),
    ((V,), (6,), torch.float32),
]
OLD_OPTIONS = {
    "arithmetic": [{}, {"lam": 0.3}, {"lam": -1.7}],
    "ties": [{}, {"density": 0.07}, {"density": 0.5, "lam": 0.7}, {"density": 1.0}],
    "dare": [{"random_seed": s, "drop": p, "lam": 0.4} for s in (0, 1, 7, 12345) for p in (0.0, 0.3, 0.5, 0.9)],
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}x{'x'.join(map(str, c[1]))}-{c[2]}")
@pytest.mark.parametrize("method", sorted(OLD))
def test_presets_reproduce_the_functions_they_replaced_bit_for_bit(method, case):
    modalities, shape, dtype = case
    old_fn, old_options = OLD[method]
    for seed in range(3):
        inputs = random_inputs(modalities, shape, 100 * seed, dtype, target=f"blocks.{seed}.mlp.fc1.weight")
        for options in OLD_OPTIONS[method]:
            merged = run(method, inputs, **options)
            assert torch.equal(merged, old_fn(inputs, old_options.parse(options))), (method, options)


@pytest.fixture
def old_global_ties():
    register_method("old_ties", OldTiesOptions, needs_origin=True, prepare=old_ties_global_thresholds)(old_ties)
    yield "old_ties"
    unregister_method("old_ties")


@pytest.mark.parametrize("options", [{"scope": "global", "density": 0.3}, {"scope": "global"}, {"density": 0.3}])
def test_ties_through_the_engine_reproduces_the_old_ties_tensor_for_tensor(micro_config, old_global_ties, options):
    """Global scope needs the pre-pass over the whole model, which only the engine runs."""
    torch.manual_seed(0)
    specific, seed = VLTransformer(micro_config), VLTransformer(micro_config.agnostic())
    state, seed_state = specific.state_dict(), seed.state_dict()
    new = merge_state_dict(state, "ties", options, seed_state=seed_state)
    old = merge_state_dict(state, old_global_ties, options, seed_state=seed_state)
    assert new.tensors.keys() == old.tensors.keys()
    assert all(torch.equal(new.tensors[k], old.tensors[k]) for k in new.tensors)
    if options.get("scope") == "global":
        assert new.prepared.thresholds == old.prepared.thresholds


# --------------------------------------------------------------------------- 2. closed forms
def np_breadcrumbs_mask(vector: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Distinct magnitudes: rank largest first, skip the top floor(gamma n), keep the next ceil(density n)."""
    n = vector.size
    keep = max(1, math.ceil(density * n - 1e-9))
    top = min(int(gamma * n + 1e-9), n - keep)
    order = np.argsort(-np.abs(vector.ravel()))
    mask = np.zeros(n, dtype=bool)
    mask[order[top : top + keep]] = True
    return mask.reshape(vector.shape)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_breadcrumbs_without_outliers_is_magnitude_trimming(density):
    vector = rand(9, 7, seed=3)
    assert torch.equal(breadcrumbs(density, 0.0)(V, vector), trim_to_top_k(vector, density))
    assert torch.equal(breadcrumbs(density, 0.0)(V, vector), magnitude(density)(V, vector))


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.01), (0.3, 0.3), (0.95, 0.2), (1.0, 0.5)])
def test_breadcrumbs_drops_outliers_and_the_smallest_entries(density, gamma):
    vector = rand(20, 10, seed=4, dtype=torch.float64)
    mask = np_breadcrumbs_mask(vector.numpy(), density, gamma)
    np.testing.assert_array_equal(breadcrumbs(density, gamma)(V, vector).numpy(), np.where(mask, vector.numpy(), 0))
    inputs = random_inputs((V, L), (20, 10), 5, torch.float64)
    taus = {m: (w - inputs.origin).numpy() for m, w in inputs.experts.items()}
    expected = inputs.origin.numpy() + 0.7 * sum(
        np.where(np_breadcrumbs_mask(t, density, gamma), t, 0) for t in taus.values()
    )
    merged = run("breadcrumbs", inputs, density=density, gamma=gamma, lam=0.7)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)


def np_ties(vectors: list[np.ndarray]) -> np.ndarray:
    """Sign of the summed mass per entry; mean of the nonzero entries of that sign."""
    stacked = np.stack(vectors)
    sign = np.sign(stacked.sum(0))
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    return np.where(agree, stacked, 0).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_breadcrumbs_ties_is_ties_consensus_on_the_breadcrumbs_masks(modalities):
    inputs = random_inputs(modalities, (12, 6), 6, torch.float64)
    taus = [(w - inputs.origin).numpy() for w in inputs.experts.values()]
    masked = [np.where(np_breadcrumbs_mask(t, 0.6, 0.1), t, 0) for t in taus]
    merged = run("breadcrumbs_ties", inputs, density=0.6, gamma=0.1, lam=0.8)
    np.testing.assert_allclose(merged.numpy(), inputs.origin.numpy() + 0.8 * np_ties(masked), rtol=1e-12, atol=1e-12)


def dare_dropped(inputs: MergeInputs, drop: float, random_seed: int) -> dict[Modality, torch.Tensor]:
    """tau_m kept where u >= drop, rescaled by 1 / (1 - drop)."""
    out = {}
    for m, w in inputs.experts.items():
        tau = w - inputs.origin
        u = uniforms(random_seed, inputs.target, m, tau.shape)
        out[m] = torch.where(u >= drop, tau, torch.zeros_like(tau)) / (1 - drop)
    return out


@pytest.mark.parametrize("random_seed", [0, 3, 99])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_dare_ties_is_ties_on_the_dare_dropped_vectors(modalities, random_seed):
    inputs = random_inputs(modalities, (10, 9), 7, torch.float64, target="blocks.1.attn.qkv.weight")
    dropped = dare_dropped(inputs, 0.4, random_seed)
    merged = run("dare_ties", inputs, drop=0.4, lam=0.9, random_seed=random_seed)
    expected = inputs.origin.numpy() + 0.9 * np_ties([d.numpy() for d in dropped.values()])
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)
    zero = torch.zeros_like(inputs.origin)  # ties untrimmed on experts theta_0 + dropped, with theta_0 = 0: exact
    dropped_from_zero = dare_dropped(MergeInputs(inputs.target, inputs.experts, zero), 0.4, random_seed)
    as_ties = run("ties", MergeInputs(inputs.target, dropped_from_zero, origin=zero), density=1.0, lam=0.9)
    from_zero = run(
        "dare_ties", MergeInputs(inputs.target, inputs.experts, zero), drop=0.4, lam=0.9, random_seed=random_seed
    )
    assert torch.equal(from_zero, as_ties)


def np_della_probabilities(vector: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Distinct magnitudes: rank r (0 = smallest), p = density - epsilon + 2 epsilon r / (n - 1)."""
    ranks = np.empty(vector.size)
    ranks[np.argsort(np.abs(vector.ravel()))] = np.arange(vector.size)
    return (density - epsilon + 2 * epsilon * ranks / (vector.size - 1)).reshape(vector.shape)


@pytest.mark.parametrize("method", ["della", "della_ties"])
@pytest.mark.parametrize("random_seed", [0, 5])
def test_della_keeps_by_magnitude_ranked_probabilities_and_rescales_by_them(method, random_seed):
    inputs = random_inputs((V, L), (8, 6), 8, torch.float64, target="blocks.0.mlp.fc2.weight")
    sparsified = []
    for m, w in inputs.experts.items():
        tau = (w - inputs.origin).numpy()
        p = np_della_probabilities(tau, 0.6, 0.2)
        u = uniforms(random_seed, inputs.target, m, tau.shape).double().numpy()
        sparsified.append(np.where(u >= 1 - p, tau / p, 0))
    consensus = sum(sparsified) if method == "della" else np_ties(sparsified)
    merged = run(method, inputs, density=0.6, epsilon=0.2, lam=0.7, random_seed=random_seed)
    np.testing.assert_allclose(merged.numpy(), inputs.origin.numpy() + 0.7 * consensus, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_della_without_spread_is_dare_with_the_complementary_drop_mask_for_mask(density, dtype):
    """epsilon 0: every keep probability is the density; the drop masks are DARE's with drop 1 - density
    (densities exact in binary, so 1 - density is the drop exactly)."""
    for random_seed in range(4):
        inputs = random_inputs((V, L, VL), (9, 5), random_seed, dtype)
        della = run("della", inputs, density=density, epsilon=0.0, lam=0.6, random_seed=random_seed)
        dare = run("dare", inputs, drop=1 - density, lam=0.6, random_seed=random_seed)
        assert torch.equal(della, dare)


def test_della_rescaling_keeps_each_entry_in_expectation():
    """Mean over seeds of the sparsified vector -> tau (each kept entry scaled by 1 / p_i); the keep
    frequency of an entry -> its p_i."""
    tau = torch.linspace(-2, 3, 16, dtype=torch.float64).view(4, 4) + 0.01
    inputs = MergeInputs("w", {V: tau}, origin=torch.zeros_like(tau))
    runs = torch.stack([run("della", inputs, density=0.5, epsilon=0.15, lam=1.0, random_seed=s) for s in range(2000)])
    torch.testing.assert_close(runs.mean(0), tau, rtol=0.0, atol=0.2 * float(tau.abs().max()))
    p = torch.from_numpy(np_della_probabilities(tau.numpy(), 0.5, 0.15))
    torch.testing.assert_close((runs != 0).double().mean(0), p, rtol=0.0, atol=0.05)


def test_della_options_keep_probabilities_in_range():
    with pytest.raises(ConfigError, match="density"):
        MERGE_METHODS.get("della").options.parse({"density": 0.1, "epsilon": 0.15})
    with pytest.raises(ConfigError, match="density"):
        MERGE_METHODS.get("della_ties").options.parse({"density": 0.9, "epsilon": 0.15})


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_sum_consensus_without_sparsification_is_arithmetic(modalities):
    inputs = random_inputs(modalities, (6, 5), 9, torch.float64)
    expected = inputs.origin.numpy() + 0.4 * sum((w - inputs.origin).numpy() for w in inputs.experts.values())
    merged = task_vector_merge(inputs, keep_all(), "sum", 0.4)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged, run("arithmetic", inputs, lam=0.4))


def test_consensus_steps_do_not_modify_their_inputs():
    vectors = [rand(4, 3, seed=i) for i in range(3)]
    copies = [v.clone() for v in vectors]
    consensus_sum(vectors)
    assert all(torch.equal(v, c) for v, c in zip(vectors, copies, strict=True))


# --------------------------------------------------------------------------- 3. properties
REAL = st.floats(-100, 100, allow_nan=False, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-6 else x)
DYADIC = st.integers(-64, 64).map(lambda i: i / 4)
SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple)
DENSITIES = st.sampled_from([0.125, 0.25, 0.5, 0.75, 1.0])

OPTIONS = {  # valid options of every family preset, drawn per example
    "arithmetic": lambda d: {"lam": d(DYADIC)},
    "ties": lambda d: {"density": d(DENSITIES), "lam": d(DYADIC)},
    "dare": lambda d: {"drop": d(st.sampled_from([0.0, 0.25, 0.5, 0.9])), "random_seed": d(st.integers(0, 99))},
    "dare_ties": lambda d: {"drop": d(st.sampled_from([0.0, 0.25, 0.5, 0.9])), "random_seed": d(st.integers(0, 99))},
    "breadcrumbs": lambda d: {"density": d(DENSITIES), "gamma": d(st.sampled_from([0.0, 0.125, 0.5])), "lam": d(DYADIC)},
    "breadcrumbs_ties": lambda d: {"density": d(DENSITIES), "gamma": d(st.sampled_from([0.0, 0.125, 0.5]))},
    "della": lambda d: {"density": 0.5, "epsilon": d(st.sampled_from([0.0, 0.25, 0.49])), "random_seed": d(st.integers(0, 99))},
    "della_ties": lambda d: {"density": 0.75, "epsilon": d(st.sampled_from([0.0, 0.125, 0.25])), "random_seed": d(st.integers(0, 99))},
}  # fmt: skip


def tensor(draw, shape, elements) -> torch.Tensor:
    return torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=elements)))


@st.composite
def expert_sets(draw, elements=REAL):
    shape = draw(SHAPES)
    modalities = draw(st.sampled_from([(V, L), (V, L, VL)]))
    return MergeInputs(
        "w", {m: tensor(draw, shape, elements) for m in modalities}, origin=tensor(draw, shape, elements)
    )


def test_every_family_preset_is_covered_here():
    assert set(OPTIONS) == set(SYMMETRIC) == set(FAMILY) and FAMILY
    assert set(NO_DROP) == set(TIES_CONSENSUS) and DETERMINISTIC_TIES


@pytest.mark.parametrize("method", FAMILY)
@FAST
@given(data=st.data())
def test_no_nan_and_the_shape_and_dtype_of_the_experts(method, data):
    inputs = data.draw(expert_sets())
    merged = run(method, inputs, **OPTIONS[method](data.draw))
    assert merged.shape == inputs.origin.shape and merged.dtype == inputs.origin.dtype
    assert bool(torch.isfinite(merged).all())


NO_DROP = {  # ties-consensus presets whose sparsification keeps every entry
    "ties": {"density": 1.0},
    "dare_ties": {"drop": 0.0},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.5},
    "della_ties": {"density": 1.0, "epsilon": 0.0},
}


@pytest.mark.parametrize("method", TIES_CONSENSUS)
@FAST
@given(expert_sets(DYADIC), st.sampled_from([0.25, 0.5, 1.0, 1.5]))
def test_ties_consensus_on_identical_experts_is_the_seed_plus_lambda_tau(method, inputs, lam):
    """Identical experts agree everywhere: the mean of the agreeing entries is tau itself."""
    w = next(iter(inputs.experts.values()))
    copies = MergeInputs("w", {m: w.clone() for m in inputs.experts}, origin=inputs.origin)
    merged = run(method, copies, lam=lam, **NO_DROP[method])
    assert torch.equal(merged, inputs.origin + lam * (w - inputs.origin))


@pytest.mark.parametrize("method", DETERMINISTIC_TIES)
@FAST
@given(expert_sets(DYADIC), DENSITIES, st.sampled_from([0.0, 0.125, 0.25]))
def test_deterministic_ties_presets_on_identical_experts_add_the_one_sparsified_vector(method, inputs, density, gamma):
    """TIES' top-k trim is Breadcrumbs' mask without outliers (gamma 0): a preset without gamma trims so."""
    w = next(iter(inputs.experts.values()))
    copies = MergeInputs("w", {m: w.clone() for m in inputs.experts}, origin=inputs.origin)
    tau = w - inputs.origin
    has_gamma = "gamma" in MERGE_METHODS.get(method).options.model_fields
    sparsify = breadcrumbs(density, gamma if has_gamma else 0.0)
    options = {"density": density} | ({"gamma": gamma} if has_gamma else {})
    assert torch.equal(run(method, copies, lam=0.5, **options), inputs.origin + 0.5 * sparsify(V, tau))


SYMMETRIC = {  # presets that treat experts alike; the random ones only without drops (masks are per modality)
    "arithmetic": {},
    "ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.125},
    "breadcrumbs_ties": {"density": 0.75, "gamma": 0.125},
    "dare": {"drop": 0.0},
    "dare_ties": {"drop": 0.0},
    "della": {"density": 1.0, "epsilon": 0.0},
    "della_ties": {"density": 1.0, "epsilon": 0.0},
}


@pytest.mark.parametrize("method", FAMILY)
@FAST
@given(expert_sets(DYADIC))
def test_symmetric_presets_ignore_which_modality_holds_which_expert(method, inputs):
    """Dyadic values: sums are exact in any order, so the check is bit for bit."""
    merged = run(method, inputs, **SYMMETRIC[method])
    for order in permutations(inputs.experts):
        relabeled = dict(zip(order, inputs.experts.values(), strict=True))
        assert torch.equal(run(method, MergeInputs("w", relabeled, origin=inputs.origin), **SYMMETRIC[method]), merged)


@pytest.mark.parametrize("method", FAMILY)
def test_every_preset_merges_a_whole_model_through_the_engine_with_its_defaults(micro_config, method):
    torch.manual_seed(0)
    specific, seed = VLTransformer(micro_config), VLTransformer(micro_config.agnostic())
    merged = merge_state_dict(specific.state_dict(), method, seed_state=seed.state_dict())
    assert merged.tensors.keys() == seed.state_dict().keys()
    assert all(bool(torch.isfinite(t).all()) for t in merged.tensors.values())
    again = merge_state_dict(specific.state_dict(), method, seed_state=seed.state_dict())
    assert all(torch.equal(merged.tensors[k], again.tensors[k]) for k in merged.tensors)  # seeded: same bytes
