"""wudi, magmax, karcher and sce against their peers' own code (FusionBench 0.2.33, mergekit 0.1.5, installed
with --no-deps) and against formulas re-derived here in numpy; the SVD family's per-expert lam.

Under CI the peers' absence is a failure, elsewhere a skip.
"""

import importlib.util
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference_code import fusion_bench_module, missing, stub_class

from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.merging import MERGE_METHODS, MergeInputs, merge_state_dict
from vlmerge.models import VLTransformer

V, L, VL = Modality.V, Modality.L, Modality.VL


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def rand(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def experts(modalities=(V, L, VL), shape=(6, 4), seed=0, dtype=torch.float64) -> tuple[dict, torch.Tensor]:
    origin = rand(*shape, seed=seed + 100, dtype=dtype)
    return {m: origin + rand(*shape, seed=seed + i, dtype=dtype) for i, m in enumerate(modalities)}, origin


def fusion_bench_wudi():
    return fusion_bench_module(
        "method/wudi/wudi.py",
        {
            "fusion_bench": {
                "BaseAlgorithm": stub_class("BaseAlgorithm"),
                "BaseModelPool": stub_class("BaseModelPool"),
                "auto_register_config": lambda cls: cls,
            },
            "fusion_bench.mixins": {"LightningFabricMixin": stub_class("LightningFabricMixin")},
            "fusion_bench.utils": {"timeit_context": lambda *args, **kwargs: nullcontext()},
            "fusion_bench.utils.state_dict_arithmetic": {"state_dict_add": None, "state_dict_sub": None},
        },
    )


def fusion_bench_magmax():
    return fusion_bench_module(
        "method/magmax/magmax.py",
        {
            "fusion_bench": {"LazyStateDict": stub_class("LazyStateDict")},
            "fusion_bench.method": {},
            "fusion_bench.method.base_algorithm": {"BaseAlgorithm": stub_class("BaseAlgorithm")},
            "fusion_bench.mixins": {
                "SimpleProfilerMixin": stub_class("SimpleProfilerMixin"),
                "auto_register_config": lambda cls: cls,
            },
            "fusion_bench.modelpool": {"BaseModelPool": stub_class("BaseModelPool")},
            "fusion_bench.utils": {},
            "fusion_bench.utils.type": {"StateDictType": dict, "TorchModelType": torch.nn.Module},
        },
    )


def mergekit_module(name: str):
    try:
        return importlib.import_module(f"mergekit.merge_methods.{name}")
    except ImportError:
        missing("mergekit==0.1.5")


# --------------------------------------------------------------------------- WUDI
def wudi_reference(origin: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """(sum_m tau_m G_m) pinv(sum_m G_m), G_m = tau_m^T tau_m / ||tau_m||^2, straight from the objective."""
    taus = [w - origin for w in weights]
    grams = [t.T @ t / np.sum(t * t) for t in taus]
    return origin + sum(t @ g for t, g in zip(taus, grams)) @ np.linalg.pinv(sum(grams), rcond=1e-12, hermitian=True)


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (2, 7)])  # (2, 7): a singular sum, the minimum-norm solution
def test_wudi_is_the_pseudo_inverse_solve_of_its_objective(modalities, shape):
    ws, origin = experts(modalities, shape)
    merged = run("wudi", MergeInputs("w", ws, origin=origin))
    expected = wudi_reference(origin.numpy(), [w.numpy() for w in ws.values()])
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 4), (2, 7)])
def test_wudi_zeroes_the_gradient_of_its_objective_with_rows_in_the_experts_row_space(shape):
    """sum_m (tau - tau_m) G_m = 0 at the minimum; and the minimum-norm one adds nothing outside the rows of the tau_m."""
    ws, origin = experts((V, L), shape, seed=3)
    tau = (run("wudi", MergeInputs("w", ws, origin=origin)) - origin).numpy()
    taus = [(w - origin).numpy() for w in ws.values()]
    gradient = sum((tau - t) @ t.T @ t / np.sum(t * t) for t in taus)
    np.testing.assert_allclose(gradient, 0, atol=1e-10)
    rows = np.linalg.svd(np.concatenate(taus), full_matrices=False)[2]
    rows = rows[: np.linalg.matrix_rank(np.concatenate(taus))]
    np.testing.assert_allclose(tau @ rows.T @ rows, tau, atol=1e-10)


REAL = st.floats(-100, 100, allow_nan=False, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-6 else x)
LINEAR = st.tuples(st.integers(1, 5), st.integers(1, 5))


# A condition number of 6241 (singular values 79.01 and 0.0127): the Gram matrix's fast path once lost digits here.
ILL_CONDITIONED = np.stack([np.zeros((5, 5)), np.eye(5)[[4, 3, 1, 2, 0]] + np.diag([0, 0, 0, 0, 79.0])])


@settings(max_examples=50, deadline=None)
@given(LINEAR.flatmap(lambda shape: hnp.arrays(np.float64, (2, *shape), elements=REAL)), st.sampled_from([2, 3]))
@example(arrays=ILL_CONDITIONED, count=2)
def test_wudi_returns_copies_of_one_expert_within_the_vectors_condition_number(arrays, count):
    """tau (sum_m G)(sum_m G)^+ = tau on its row space, for any tau; a pseudo-inverse loses digits as the
    smallest kept singular value of tau falls, so the tolerance follows the condition number."""
    w, origin = (torch.from_numpy(a) for a in arrays)
    experts_ = dict(zip((V, L, VL), [w.clone() for _ in range(count)]))
    merged = run("wudi", MergeInputs("w", experts_, origin=origin))
    s = np.linalg.svd((w - origin).numpy(), compute_uv=False)
    kept = s[s > 1e-10 * s[0]] if s[0] > 0 else np.ones(1)
    tolerance = 1e-14 * float(kept[0] / kept[-1]) * (1 + float(s[0])) + 1e-12 * (1 + float(w.abs().max()))
    torch.testing.assert_close(merged, w, rtol=0, atol=tolerance)


@settings(max_examples=50, deadline=None)
@given(LINEAR, st.sampled_from([(V, L), (V, L, VL)]), st.integers(0, 2**16))
def test_wudi_is_a_minimum_of_its_objective_for_experts_in_general_position(shape, modalities, seed):
    """The objective at the closed form is below its value at the sum (the iterative start) and at random
    points near the closed form."""
    ws, origin = experts(modalities, shape, seed=seed)
    taus = [(w - origin).numpy() for w in ws.values()]

    def objective(tau: np.ndarray) -> float:
        return sum(float(np.sum(((tau - t) @ t.T) ** 2) / np.sum(t * t)) for t in taus)

    best = (run("wudi", MergeInputs("w", ws, origin=origin)) - origin).numpy()
    generator = np.random.default_rng(seed)
    assert objective(best) <= objective(sum(taus)) + 1e-9
    for _ in range(5):
        assert objective(best) <= objective(best + 1e-3 * generator.standard_normal(best.shape)) + 1e-12


def test_wudi_averages_the_tensors_that_are_not_2d_and_scales_by_lam():
    ws, origin = experts((V, L, VL), (5,))
    expected = origin + 0.7 * sum(w - origin for w in ws.values()) / 3
    for solver in ("closed", "iterative"):
        merged = run("wudi", MergeInputs("b", ws, origin=origin), lam=0.7, solver=solver)
        torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


def test_wudi_closed_form_is_what_the_iterative_form_reaches():
    """Adam from the sum, run long enough on a small full-rank weight, lands on the closed form."""
    ws, origin = experts((V, L, VL), (5, 3), seed=7)
    closed = run("wudi", MergeInputs("w", ws, origin=origin))
    start = origin + sum(w - origin for w in ws.values())
    iterated = run("wudi", MergeInputs("w", ws, origin=origin), solver="iterative", steps=4000, lr=1e-2)
    assert float((start - closed).abs().max()) > 0.1  # the start is far from the minimum
    torch.testing.assert_close(iterated, closed, rtol=0, atol=1e-9)


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_wudi_iterative_equals_fusion_benchs_wudi_merging(modalities, capsys):
    """Bit for bit in float32, FusionBench's dtype: the same Adam steps on the same loss; 1-D tensors averaged."""
    reference = fusion_bench_wudi().wudi_merging
    weights = {
        key: experts(modalities, shape, seed=11, dtype=torch.float32) for key, shape in {"w": (6, 4), "b": (6,)}.items()
    }
    task_vectors = [{key: ws[m] - origin for key, (ws, origin) in weights.items()} for m in modalities]
    theirs = reference(task_vectors, accelerator="cpu", iter_num=25)
    for key, (ws, origin) in weights.items():
        ours = run("wudi", MergeInputs(key, ws, origin=origin), solver="iterative", steps=25)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, origin + theirs[key].detach(), rtol=0, atol=0)
    capsys.readouterr()  # FusionBench writes each key


def test_wudi_leaves_zero_modality_vectors_out_and_returns_the_seed_for_all_zero():
    ws, origin = experts((V, L), (4, 3), seed=5)
    with_zero = {**ws, VL: origin.clone()}
    for solver in ("closed", "iterative"):
        merged = run("wudi", MergeInputs("w", with_zero, origin=origin), solver=solver, steps=3)
        assert bool(torch.isfinite(merged).all())
        zeros = {m: origin.clone() for m in ws}
        assert torch.equal(run("wudi", MergeInputs("w", zeros, origin=origin), solver=solver, steps=3), origin)
    expected = wudi_reference(origin.numpy(), [w.numpy() for w in ws.values()])
    np.testing.assert_allclose(run("wudi", MergeInputs("w", with_zero, origin=origin)).numpy(), expected, rtol=1e-9)


def test_wudi_computes_in_float64_and_returns_the_experts_dtype():
    ws, origin = experts((V, L), (6, 4), seed=2)
    half = {m: w.to(torch.bfloat16) for m, w in ws.items()}
    merged = run("wudi", MergeInputs("w", half, origin=origin.to(torch.bfloat16)))
    exact = run(
        "wudi", MergeInputs("w", {m: w.double() for m, w in half.items()}, origin=origin.to(torch.bfloat16).double())
    )
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, exact.to(torch.bfloat16))


# --------------------------------------------------------------------------- MagMax
def magmax_reference(origin: np.ndarray, weights: list[np.ndarray], lam: float) -> np.ndarray:
    """Per entry the tau of largest magnitude, the last of equal magnitudes (argmax of the reversed stack)."""
    taus = np.stack([w - origin for w in weights])[::-1]
    chosen = np.take_along_axis(taus, np.abs(taus).argmax(axis=0)[None], axis=0)[0]
    return origin + lam * chosen


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_magmax_keeps_each_entrys_largest_move_later_experts_winning_ties(modalities):
    ws, origin = experts(modalities, (7, 5))
    ws[modalities[-1]][0, 0] = origin[0, 0] - (ws[V][0, 0] - origin[0, 0])  # a tie: the same magnitude, opposite sign
    merged = run("magmax", MergeInputs("w", ws, origin=origin), lam=0.8)
    np.testing.assert_allclose(
        merged.numpy(), magmax_reference(origin.numpy(), [w.numpy() for w in ws.values()], 0.8), rtol=0, atol=1e-14
    )
    assert merged[0, 0] == origin[0, 0] + 0.8 * (ws[modalities[-1]][0, 0] - origin[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_magmax_equals_fusion_benchs_magmax_merge(modalities, dtype):
    module = fusion_bench_magmax()
    shapes = {"weight": (6, 4), "bias": (6,)}
    weights = {
        key: experts(modalities, shape, seed=13 + i, dtype=dtype) for i, (key, shape) in enumerate(shapes.items())
    }

    def model(tensors: dict) -> torch.nn.Module:
        holder = torch.nn.Module()
        for key, value in tensors.items():
            holder.register_parameter(key, torch.nn.Parameter(value.clone()))
        return holder

    pretrained = model({key: origin for key, (_, origin) in weights.items()})
    finetuned = [model({key: ws[m] for key, (ws, _) in weights.items()}) for m in modalities]
    theirs = module.magmax_merge(pretrained, finetuned, scaling_factor=0.5).state_dict()
    for key, (ws, origin) in weights.items():
        torch.testing.assert_close(run("magmax", MergeInputs(key, ws, origin=origin)), theirs[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- Karcher
def karcher_reference(weights: list[np.ndarray], steps: int = 200) -> np.ndarray:
    """The direction minimising sum_m arccos(<u, e_m>)^2 by Riemannian gradient steps run to convergence,
    times the mean norm."""
    flat = [w.ravel() for w in weights]
    units = [x / np.linalg.norm(x) for x in flat]
    u = sum(units) / np.linalg.norm(sum(units))
    for _ in range(steps):
        tangent = np.zeros_like(u)
        for e in units:
            cos = np.clip(u @ e, -1, 1)
            theta = np.arccos(cos)
            if theta > 1e-15:
                tangent += theta / np.sin(theta) * (e - cos * u) / len(units)
        step = np.linalg.norm(tangent)
        if step < 1e-15:
            break
        u = np.cos(step) * u + np.sin(step) * tangent / step
        u /= np.linalg.norm(u)
    return (np.mean([np.linalg.norm(x) for x in flat]) * u).reshape(weights[0].shape)


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_karcher_is_the_spherical_mean_of_the_directions_times_the_mean_norm(modalities):
    ws, _ = experts(modalities, (6, 4), seed=21)
    merged = run("karcher", MergeInputs("w", ws), max_iter=200, tol=1e-12)
    expected = karcher_reference([w.numpy() for w in ws.values()])
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-9, atol=1e-11)


def test_karcher_of_two_experts_is_their_slerp_midpoint_rescaled():
    """On a great circle the Fréchet mean of two points is its midpoint: SLERP at t = 1/2, normalised."""
    ws, _ = experts((V, L), (5, 3), seed=4)
    a, b = ws.values()
    midpoint = run("slerp", MergeInputs("w", {V: a / a.norm(), L: b / b.norm()}))
    expected = (a.norm() + b.norm()) / 2 * midpoint / midpoint.norm()
    torch.testing.assert_close(run("karcher", MergeInputs("w", ws)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", [(6, 4), (9,)])
def test_karcher_equals_mergekits(modalities, dtype, shape):
    karcher = mergekit_module("karcher")
    ws, _ = experts(modalities, shape, seed=30, dtype=dtype)
    theirs = karcher.karcher_merge_tensors(list(ws.values()), [1 / len(ws)] * len(ws), max_iter=10, tol=1e-5)
    assert torch.equal(run("karcher", MergeInputs("w", ws)), theirs)


def test_karcher_gives_zero_tensors_no_direction_but_counts_their_norm():
    ws, _ = experts((V, L), (4, 3), seed=8)
    merged = run("karcher", MergeInputs("w", {**ws, VL: torch.zeros(4, 3, dtype=torch.float64)}))
    two = run("karcher", MergeInputs("w", ws))
    torch.testing.assert_close(merged, two * 2 / 3, rtol=1e-12, atol=1e-12)  # the mean norm over three
    zeros = {m: torch.zeros(3, dtype=torch.float64) for m in (V, L)}
    assert torch.equal(run("karcher", MergeInputs("w", zeros)), torch.zeros(3, dtype=torch.float64))


# --------------------------------------------------------------------------- SCE
def sce_reference(origin: np.ndarray, weights: list[np.ndarray], select_topk: float) -> np.ndarray:
    """Entry by entry: the top-k variance mask, weights mean(tau^2) normalised, the majority sign's mean."""
    taus = np.stack([w - origin for w in weights]).reshape(len(weights), -1)
    if select_topk < 1:
        variance = taus.var(axis=0)
        k = int(np.count_nonzero(variance) * select_topk)
        mask = np.zeros(taus.shape[1])
        mask[np.argsort(-variance, kind="stable")[:k]] = 1
        taus = taus * mask
    weight = (taus**2).mean(axis=1)
    weight = weight / weight.sum() if weight.sum() >= 1e-6 else np.full(len(weights), 1 / len(weights))
    merged = np.zeros(taus.shape[1])
    for i in range(taus.shape[1]):
        sign = 1.0 if taus[:, i].sum() >= 0 else -1.0
        kept = np.sign(taus[:, i]) == sign
        merged[i] = (weight[kept] * taus[kept, i]).sum() / max(weight[kept].sum(), 1e-6)
    return origin + merged.reshape(origin.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_sce_selects_calculates_and_erases_entry_by_entry(modalities, select_topk):
    ws, origin = experts(modalities, (8, 5), seed=40)
    merged = run("sce", MergeInputs("w", ws, origin=origin), select_topk=select_topk)
    expected = sce_reference(origin.numpy(), [w.numpy() for w in ws.values()], select_topk)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", [(8, 5), (11,)])
def test_sce_equals_mergekits(modalities, select_topk, dtype, shape):
    sce = mergekit_module("sce")
    base = mergekit_module("base")
    ws, origin = experts(modalities, shape, seed=50, dtype=dtype)
    entries = [origin, *ws.values()]
    group = base.TensorGroup(tuple(base.TensorEntry(f"m{i}", w, is_base=i == 0) for i, w in enumerate(entries)))
    theirs = sce.sce_merge.implementation(group, select_topk=select_topk)
    ours = run("sce", MergeInputs("w", ws, origin=origin), select_topk=select_topk)
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- the SVD family's per-expert lam
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(7, 5), (5,)])
def test_svd_methods_scale_each_modality_vector_by_its_own_lam_before_the_merge(method, shape):
    ws, origin = experts((V, L, VL), shape, seed=60)
    lam = {V: 1.5, L: 0.5, VL: -0.25}
    merged = run(method, MergeInputs("w", ws, origin=origin), lam=1.0)  # the option parses; the mapping is built here
    entry = MERGE_METHODS.get(method)
    options = entry.options.model_construct(**{**entry.options.parse({}).model_dump(), "lam": lam})
    per_expert = entry.fn(MergeInputs("w", ws, origin=origin), options)
    scaled = {m: origin + lam[m] * (w - origin) for m, w in ws.items()}
    torch.testing.assert_close(per_expert, run(method, MergeInputs("w", scaled, origin=origin)), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(per_expert, merged)


def test_svd_per_expert_lam_through_the_engine(micro_config):
    torch.manual_seed(0)
    state, seed = VLTransformer(micro_config).state_dict(), VLTransformer(micro_config.agnostic()).state_dict()
    merged = merge_state_dict(state, "tsv", {"lam": {"v": 0.5, "default": 1.0}}, seed_state=seed).tensors
    target = "blocks.0.mlp.fc1.weight"
    ws = {m: state[target.replace("mlp.", f"mlp.{m.value}.")] for m in (V, L)}
    scaled = {V: seed[target] + 0.5 * (ws[V] - seed[target]), L: ws[L]}
    torch.testing.assert_close(
        merged[target], run("tsv", MergeInputs(target, scaled, origin=seed[target])), rtol=1e-6, atol=1e-7
    )


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "method, options, named",
    [
        ("wudi", {"solver": "newton"}, "solver"),
        ("wudi", {"steps": 0}, "steps"),
        ("wudi", {"lr": 0.0}, "lr"),
        ("wudi", {"lr": 2.0}, "lr"),
        ("karcher", {"max_iter": 0}, "max_iter"),
        ("karcher", {"tol": 0.0}, "tol"),
        ("sce", {"select_topk": 0.0}, "select_topk"),
        ("sce", {"select_topk": 1.5}, "select_topk"),
        ("magmax", {"lam": "big"}, "lam"),
        ("magmax", {"density": 0.5}, "density"),
    ],
)
def test_bad_options_are_one_error_naming_the_option(method, options, named):
    with pytest.raises(ConfigError, match=named) as error:
        MERGE_METHODS.get(method).options.parse(options)
    assert str(error.value).count("\n") <= 2


@pytest.mark.parametrize("method", ["wudi", "magmax", "karcher", "sce"])
def test_each_new_method_names_its_source_and_describes_every_option(method):
    entry = MERGE_METHODS.get(method)
    assert any(source in entry.summary for source in ("2024", "2025", "mergekit"))
    assert all(field.description for field in entry.options.model_fields.values())
    assert entry.needs_origin == (method != "karcher")


def test_magmax_and_wudi_default_to_their_references_scaling():
    assert MERGE_METHODS.get("magmax").options.parse({}).lam == 0.5  # the MagMax release's scaling_coef
    wudi = MERGE_METHODS.get("wudi").options.parse({})
    assert (wudi.lam, wudi.solver, wudi.steps, wudi.lr) == (1.0, "closed", 300, 1e-5)  # FusionBench adds tau unscaled
