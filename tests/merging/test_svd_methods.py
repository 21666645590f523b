"""The SVD family (tsv, iso_c, iso_cts) against closed forms computed here with numpy, and against
FusionBench's own functions where fusion-bench is installed.

Closed forms: Iso-C is the summed vector's singular bases with the mean singular value; TSV of one
expert (share 1) is the expert; TSV of experts with mutually orthogonal row and column spaces is
task arithmetic; TSV of copies is the best rank-k approximation (Eckart-Young); Iso-CTS has a flat
spectrum whose value and subspaces follow from its definition.
"""

import numpy as np
import pytest
import torch
from reference_code import fusion_bench_module

from vlmerge.core.modality import Modality
from vlmerge.core.threads import one_thread
from vlmerge.merging import MERGE_METHODS, MergeInputs, merge_state_dict, svd
from vlmerge.merging.svd import subspace_sizes
from vlmerge.models import VLTransformer

V, L, VL = Modality.V, Modality.L, Modality.VL
# The family is what merging/svd.py registers: a method written there decomposes its modality vectors.
SVD_METHODS = [name for name in MERGE_METHODS if MERGE_METHODS.get(name).fn.__module__ == svd.__name__]


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def experts(modalities=(V, L), shape=(10, 7), seed=0) -> tuple[dict, torch.Tensor]:
    """Random full-rank experts and an origin, float64."""
    return {m: rand(*shape, seed=seed + i) for i, m in enumerate(modalities)}, rand(*shape, seed=seed + 10)


def orthogonal(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def delta(merged: torch.Tensor, origin: torch.Tensor, lam: float) -> np.ndarray:
    """(merged - theta_0) / lam: the merged modality vector."""
    return ((merged - origin) / lam).numpy()


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix, compute_uv=False)


def projector(columns: np.ndarray) -> np.ndarray:
    """Orthogonal projector onto the span of `columns` (full column rank)."""
    q, _ = np.linalg.qr(columns)
    return q @ q.T


# --------------------------------------------------------------------------- Iso-C
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", [(10, 7), (7, 10)])
def test_iso_c_is_the_sum_with_every_singular_value_replaced_by_their_mean(modalities, shape):
    ws, origin = experts(modalities, shape)
    merged = run("iso_c", MergeInputs("w", ws, origin=origin), lam=0.7)
    total = sum(ws[m].numpy() - origin.numpy() for m in modalities)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    result = delta(merged, origin, 0.7)
    np.testing.assert_allclose(singular_values(result), np.full(min(shape), s.mean()), rtol=1e-10)
    np.testing.assert_allclose(result, s.mean() * u @ vt, rtol=1e-10, atol=1e-10)  # the same singular subspaces
    np.testing.assert_allclose(projector(u) @ result, result, atol=1e-10)


def test_iso_c_lam_default_and_dtype_follow_the_paper_and_the_experts():
    assert MERGE_METHODS.get("iso_c").options.parse({}).lam == 1.0
    ws, origin = experts()
    half = {m: w.to(torch.bfloat16) for m, w in ws.items()}
    merged = run("iso_c", MergeInputs("w", half, origin=origin.to(torch.bfloat16)))
    assert merged.dtype == torch.bfloat16


# --------------------------------------------------------------------------- TSV
@pytest.mark.parametrize("share", [None, 1.0])
@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
def test_tsv_of_one_expert_at_full_rank_is_theta_0_plus_lam_tau(share, shape):
    """One expert: 1/M = 1, every component kept, its bases already orthonormal."""
    ws, origin = experts((V,), shape)
    merged = run("tsv", MergeInputs("w", ws, origin=origin), lam=0.6, share=share)
    np.testing.assert_allclose(merged.numpy(), (origin + 0.6 * (ws[V] - origin)).numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ranks", [(3, 3), (4, 4), (2, 3, 3)])
def test_tsv_of_experts_with_orthogonal_row_and_column_spaces_is_task_arithmetic(ranks):
    """tau_m = Q_m diag(s_m) R_m^T on disjoint columns of orthogonal Q and R, rank <= min(out, in) / M: TSV
    keeps every component, the stacked bases are orthonormal already, so TSV adds the vectors."""
    out, inp = 14, 10
    q, r = orthogonal(out, 1), orthogonal(inp, 2)
    modalities = (V, L, VL)[: len(ranks)]
    origin = rand(out, inp, seed=3)
    ws, start = {}, 0
    for i, (m, rank) in enumerate(zip(modalities, ranks)):
        s = np.random.default_rng(10 + i).uniform(0.5, 3.0, rank)
        tau = q[:, start : start + rank] @ np.diag(s) @ r[:, start : start + rank].T
        ws[m], start = origin + torch.from_numpy(tau), start + rank
    merged = run("tsv", MergeInputs("w", ws, origin=origin), lam=0.8)
    arithmetic = origin.numpy() + 0.8 * sum(ws[m].numpy() - origin.numpy() for m in modalities)
    np.testing.assert_allclose(merged.numpy(), arithmetic, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged, run("arithmetic", MergeInputs("w", ws, origin=origin), lam=0.8))


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_tsv_of_copies_is_the_best_rank_k_approximation_of_the_one_vector(modalities):
    """Copies stack the same top-k basis M times; orthogonalised on its range it averages back to
    U_k diag(s_k) V_k^T with k = floor(min(out, in) / M), the Eckart-Young truncation."""
    w, origin = rand(12, 9, seed=4), rand(12, 9, seed=5)
    merged = run("tsv", MergeInputs("w", {m: w.clone() for m in modalities}, origin=origin), lam=1.3)
    u, s, vt = np.linalg.svd((w - origin).numpy(), full_matrices=False)
    k = 9 // len(modalities)
    np.testing.assert_allclose(delta(merged, origin, 1.3), u[:, :k] * s[:k] @ vt[:k], rtol=1e-9, atol=1e-10)


def test_tsv_of_copies_with_share_one_returns_them():
    """The stack repeats each direction M times (rank-deficient); orthogonalised on its range, it is exact."""
    w, origin = rand(6, 4, seed=6), rand(6, 4, seed=7)
    merged = run("tsv", MergeInputs("w", {V: w, L: w.clone(), VL: w.clone()}, origin=origin), share=1.0, lam=1.0)
    np.testing.assert_allclose(merged.numpy(), w.numpy(), rtol=1e-10, atol=1e-10)


def test_tsv_keeps_share_of_each_vector_and_the_merged_rank_adds_up():
    """Generic experts: M k stacked components, k = floor(share * min(out, in)), give a merged vector of rank M k."""
    ws, origin = experts((V, L, VL), shape=(20, 16))
    for share, rank in [(None, 3 * 5), (0.25, 3 * 4), (0.1, 3 * 1)]:
        merged = delta(run("tsv", MergeInputs("w", ws, origin=origin), share=share), origin, 1.0)
        assert np.linalg.matrix_rank(merged, tol=1e-8) == rank, share


# --------------------------------------------------------------------------- Iso-CTS
def iso_cts_parts(ws: dict, origin: torch.Tensor, common_share: float):
    """The common left basis (top k_c of the sum), each expert's top-n left basis and singular values
    after removing the common column space, all with numpy."""
    taus = [(w - origin).numpy() for w in ws.values()]
    rank = min(taus[0].shape)
    common, per_expert = subspace_sizes(rank, len(taus), common_share)
    u, s, _ = np.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :common]
    specific_u, values = [], [s[:common]]
    for tau in taus:
        ut, st, _ = np.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        specific_u.append(ut[:, :per_expert])
        values.append(st[:per_expert])
    return uc, specific_u, np.concatenate(values)


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("common_share", [0.8, 0.5])
def test_iso_cts_has_a_flat_full_rank_spectrum_at_the_mean_of_its_parts(modalities, common_share):
    ws, origin = experts(modalities, shape=(16, 10))
    merged = delta(run("iso_cts", MergeInputs("w", ws, origin=origin), common_share=common_share, lam=0.9), origin, 0.9)
    _, _, values = iso_cts_parts(ws, origin, common_share)
    assert values.size == 10  # common + M * per expert = min(out, in)
    np.testing.assert_allclose(singular_values(merged), np.full(10, values.mean()), rtol=1e-9)


@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
def test_iso_cts_column_space_holds_the_common_and_every_task_specific_subspace(modalities):
    """Tall weights (out > in): the merged vector's column space has dimension in and is spanned exactly
    by the sum's top-k_c left vectors and each expert's top-n left vectors outside them."""
    ws, origin = experts(modalities, shape=(18, 8))
    merged = delta(run("iso_cts", MergeInputs("w", ws, origin=origin)), origin, 1.0)
    uc, specific_u, _ = iso_cts_parts(ws, origin, 0.8)
    u_merged, s_merged, _ = np.linalg.svd(merged, full_matrices=False)
    p = u_merged[:, s_merged > 1e-9 * s_merged[0]]
    spanned = p @ p.T
    for basis in [uc, *specific_u]:
        np.testing.assert_allclose(spanned @ basis, basis, atol=1e-9)
    np.testing.assert_allclose(spanned, projector(np.concatenate([uc, *specific_u], axis=1)), atol=1e-9)


def test_iso_cts_with_only_the_common_subspace_is_iso_c():
    ws, origin = experts((V, L, VL), shape=(9, 12))
    inputs = MergeInputs("w", ws, origin=origin)
    torch.testing.assert_close(
        run("iso_cts", inputs, common_share=1.0, lam=0.5), run("iso_c", inputs, lam=0.5), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    "rank, experts_, share, expected",
    [
        (768, 2, 0.8, (614, 77)),  # base width, v and l: 614 common, 77 each
        (768, 3, 0.8, (615, 51)),  # 154 left over, 51 each, the odd one to the common part
        (8, 3, 0.8, (5, 1)),  # round(2 / 3) = 1 per expert
        (5, 2, 0.8, (5, 0)),  # round(0.5) = 0, as Python (and FusionBench) rounds
        (7, 2, 0.0, (1, 3)),  # round(3.5) = 4 would overrun the rank: capped at rank // M
        (6, 3, 1.0, (6, 0)),
    ],
)
def test_iso_cts_subspace_sizes_add_up_to_the_rank(rank, experts_, share, expected):
    common, per_expert = subspace_sizes(rank, experts_, share)
    assert (common, per_expert) == expected and common + experts_ * per_expert == rank


# --------------------------------------------------------------------------- the family as a whole
@pytest.mark.parametrize("method", SVD_METHODS)
def test_non_matrix_tensors_add_or_average_the_modality_vectors(method):
    ws, origin = experts((V, L, VL), shape=(7,))
    taus = [ws[m] - origin for m in ws]
    summed = run(method, MergeInputs("b", ws, origin=origin), lam=0.4)
    mean = run(method, MergeInputs("b", ws, origin=origin), lam=0.4, non_matrix="mean")
    torch.testing.assert_close(summed, origin + 0.4 * sum(taus), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, origin + 0.4 * sum(taus) / 3, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_experts_equal_to_the_seed_merge_to_the_seed(method):
    """Every modality vector is zero: no singular direction survives, nothing is added (no NaN from 0/0)."""
    origin = rand(6, 5, seed=8)
    merged = run(method, MergeInputs("w", {V: origin.clone(), L: origin.clone()}, origin=origin))
    assert torch.equal(merged, origin)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_half_precision_experts_merge_in_float64_and_come_back_in_their_dtype(method):
    ws, origin = experts(shape=(12, 8))
    low = {m: w.to(torch.float16) for m, w in ws.items()}
    merged = run(method, MergeInputs("w", low, origin=origin.to(torch.float16)))
    exact = run(
        method, MergeInputs("w", {m: w.double() for m, w in low.items()}, origin=origin.to(torch.float16).double())
    )
    assert merged.dtype == torch.float16
    torch.testing.assert_close(merged, exact.to(torch.float16), rtol=0, atol=0)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_each_method_names_its_paper_and_describes_every_option(method):
    entry = MERGE_METHODS.get(method)
    assert entry.needs_origin and ("2025" in entry.summary)
    assert all(field.description for field in entry.options.model_fields.values())
    assert entry.options.parse({}).lam == 1.0  # FusionBench's default scaling for all three


@pytest.mark.parametrize("method", SVD_METHODS)
def test_merges_a_whole_model_through_the_engine(micro_config, method):
    """Every seed key comes back; each merged block tensor is the method applied to its experts' tensors
    (the engine only routes), 2-D weights by SVD, the rest by the sum. The engine computes on one thread
    (core/threads.py), and so does the reference here: an SVD's last bits follow the thread count."""
    torch.manual_seed(0)
    specific, seed = VLTransformer(micro_config), VLTransformer(micro_config.agnostic())
    state, seed_state = specific.state_dict(), seed.state_dict()
    merged = merge_state_dict(state, method, seed_state=seed_state).tensors
    assert merged.keys() == seed_state.keys()
    groups: dict[str, dict] = {}
    for key, value in state.items():
        for m in (V, L, VL):
            if f".{m.value}." in key:
                groups.setdefault(key.replace(f".{m.value}.", "."), {})[m] = value
    checked = {1: 0, 2: 0}
    for target, ws in groups.items():
        if len(ws) > 1:
            with one_thread():
                expected = run(method, MergeInputs(target, ws, origin=seed_state[target]))
            torch.testing.assert_close(merged[target], expected, rtol=0, atol=0)
            checked[min(next(iter(ws.values())).ndim, 2)] += 1
    assert checked[1] and checked[2]


# --------------------------------------------------------------------------- FusionBench, where installed
FUSION_BENCH = {  # method -> (file, function of a list of task-vector state dicts)
    "tsv": ("method/task_singular_vector/utils/TSVM_utils.py", "compute_and_sum_svd_mem_reduction"),
    "iso_c": ("method/isotropic_merging/iso_utils.py", "iso_c"),
    "iso_cts": ("method/isotropic_merging/iso_utils.py", "iso_cts"),
}


def test_every_svd_method_has_a_fusion_bench_reference():
    assert SVD_METHODS and sorted(FUSION_BENCH) == sorted(SVD_METHODS)


@pytest.mark.parametrize("method", sorted(FUSION_BENCH))
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("shape", [(16, 10), (10, 16), (48, 32), (32, 48)])
@pytest.mark.parametrize("decay", [0.0, 4.0])
def test_matches_fusion_bench_on_full_rank_vectors(method, modalities, shape, decay, capsys):
    """FusionBench averages tensors that are not 2-D, our non_matrix=mean; on full-rank inputs the two agree,
    to 1e-9 of the merged vector where the vectors' spectra are flat, to 1e-7 where they fall over 4 decades
    (Iso-C's sum then beyond what a Gram matrix resolves, taking the full SVD; Iso-CTS's small task-specific
    directions are then determined only to about 1e-8, by FusionBench's float64 SVDs as by ours)."""
    file, name = FUSION_BENCH[method]
    reference = getattr(fusion_bench_module(file), name)
    weights = {
        key: experts(modalities, dims, seed=20 + i) for i, (key, dims) in enumerate({"w": shape, "b": (5,)}.items())
    }
    ws, origin = weights["w"]
    columns = torch.logspace(0.0, -decay, shape[1], dtype=torch.float64)  # scaled columns: a falling spectrum
    weights["w"] = ({m: origin + (w - origin) * columns for m, w in ws.items()}, origin)
    task_vectors = [{key: ws[m] - origin for key, (ws, origin) in weights.items()} for m in modalities]
    extra = {"common_space_fraction": 0.8} if method == "iso_cts" else {}
    expected = reference(task_vectors, accelerator="cpu", **extra)
    for key, (ws, origin) in weights.items():
        merged = run(method, MergeInputs(key, ws, origin=origin), lam=1.0, non_matrix="mean")
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(merged - origin, expected[key], rtol=0, atol=(1e-7 if decay else 1e-9) * scale)
    capsys.readouterr()  # FusionBench prints per key
