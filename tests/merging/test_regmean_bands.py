"""RegMean reads each Gram matrix a band of rows at a time and still solves its closed form.

W* = (sum_m W_m G~_m)(sum_m G~_m)^-1 with G~ = alpha G + (1 - alpha) diag(G), computed here with
numpy from whole matrices, against RegMean summing bands (bands smaller than the matrix, and a last
band shorter than the others), from a plain mapping of matrices and from a Gram file through the
engine. Through the engine no Gram matrix is ever read whole: not by the checks, not by the merge.
"""

import numpy as np
import pytest
import torch
from conftest import make_inputs

import vlmerge.merging.methods as methods_module
from vlmerge.core.modality import Modality
from vlmerge.io.checkpoint import file_sha256, open_checkpoint
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.io.safetensors_file import SafetensorsFile
from vlmerge.merging import MERGE_METHODS, MergeInputs, MergeWarning, merge_checkpoint
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.plan import build_merge_plan
from vlmerge.models import VLTransformer, save_model

V, L, VL = Modality.V, Modality.L, Modality.VL


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram(n, rows, seed, zero_columns=0):
    x = rand(rows, n, seed=seed)
    x[:, :zero_columns] = 0
    return x.T @ x


def numpy_regmean(ws, gs, alpha):
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    return np.linalg.solve(sum(shrunk).T, sum(w @ g for w, g in zip(ws, shrunk)).T).T


def run_regmean(inputs, alpha):
    entry = MERGE_METHODS.get("regmean")
    return entry.fn(inputs, entry.options.parse({"alpha": alpha}))


class RowsOnly(dict):
    """A mapping like the engine's: matrices only a band at a time (a whole lookup fails)."""

    def __init__(self, grams):
        super().__init__(grams)
        self.bands = []

    def __getitem__(self, modality):
        raise AssertionError("a Gram matrix was looked up whole")

    def get(self, modality, default=None):
        raise AssertionError("a Gram matrix was looked up whole")

    def row_reader(self, modality):
        matrix = dict.get(self, modality)
        if matrix is None:
            return None

        def read(start, stop):
            self.bands.append(stop - start)
            return matrix[start:stop].clone()

        return read


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("modalities", [(V, L), (V, L, VL)])
@pytest.mark.parametrize("rows", [3, 8, 256])
def test_banded_regmean_is_the_closed_form(monkeypatch, alpha, modalities, rows):
    monkeypatch.setattr(methods_module, "GRAM_ROWS", rows)
    ws = {m: rand(5, 8, seed=i) for i, m in enumerate(modalities)}
    gs = {m: gram(8, 20, seed=10 + i) for i, m in enumerate(modalities)}
    expected = numpy_regmean([ws[m].numpy() for m in modalities], [gs[m].numpy() for m in modalities], alpha)
    plain = run_regmean(MergeInputs("w", ws, grams=gs), alpha)
    banded = RowsOnly(gs)
    streamed = run_regmean(MergeInputs("w", ws, grams=banded), alpha)
    np.testing.assert_allclose(plain.numpy(), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(streamed.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert max(banded.bands) == min(rows, 8)
    assert sum(banded.bands) == 8 * len(modalities)  # each matrix read once


def test_a_matrix_zero_in_its_first_bands_is_not_taken_for_an_empty_one(monkeypatch, recwarn):
    monkeypatch.setattr(methods_module, "GRAM_ROWS", 2)
    ws = {V: rand(3, 6, seed=1), L: rand(3, 6, seed=2)}
    gs = {V: gram(6, 12, seed=3, zero_columns=4), L: gram(6, 12, seed=4)}  # v's rows 0-3 are zero
    merged = run_regmean(MergeInputs("w", ws, grams=RowsOnly(gs)), 1.0)
    expected = numpy_regmean([ws[V].numpy(), ws[L].numpy()], [gs[V].numpy(), gs[L].numpy()], 1.0)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert not [w for w in recwarn if issubclass(w.category, MergeWarning)]


def test_missing_and_empty_matrices_are_named_as_before(monkeypatch):
    monkeypatch.setattr(methods_module, "GRAM_ROWS", 2)
    ws = {V: rand(3, 5, seed=1), L: rand(3, 5, seed=2), VL: rand(3, 5, seed=3)}
    average = (ws[V] + ws[L] + ws[VL]) / 3
    with pytest.warns(MergeWarning, match=r"no Gram matrix for expert\(s\) \['l', 'vl'\]"):
        missing = run_regmean(MergeInputs("w", ws, grams=RowsOnly({V: gram(5, 9, 1), L: None, VL: None})), 1.0)
    torch.testing.assert_close(missing, average)
    zero = torch.zeros(5, 5, dtype=torch.float64)
    with pytest.warns(MergeWarning, match=r"Gram matrix of expert\(s\) \['v', 'vl'\] is all zero"):
        empty = run_regmean(MergeInputs("w", ws, grams=RowsOnly({V: zero, L: gram(5, 9, 1), VL: zero})), 1.0)
    torch.testing.assert_close(empty, average)


def test_a_singular_sum_still_falls_back_to_least_squares(monkeypatch):
    """The factorisation overwrites the sum; the fallback sums the bands again."""
    monkeypatch.setattr(methods_module, "GRAM_ROWS", 3)
    ws = {V: rand(3, 4, seed=1), L: rand(3, 4, seed=2)}
    x = rand(2, 4, seed=3)  # rank 2 < 4
    g = x.T @ x
    with pytest.warns(MergeWarning, match="singular"):
        merged = run_regmean(MergeInputs("w", ws, grams=RowsOnly({V: g, L: g})), 1.0)
    expected = ((ws[V] + ws[L]).numpy() @ g.numpy()) @ np.linalg.pinv(2 * g.numpy())
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-8)


def test_through_the_engine_no_gram_matrix_is_read_whole(micro_config, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VLTransformer(micro_config)
    source = save_model(model, tmp_path / "specific.safetensors")
    pairs = make_inputs(micro_config, seed=4)
    batches = [{"images": pairs["images"]}, {"text_ids": pairs["text_ids"], "text_mask": pairs["text_mask"]}, pairs]
    grams, info = collect_grams(model, batches)  # every expert sees tokens: every matrix exists
    provenance = {"checkpoint": {"path": str(source), "sha256": file_sha256(source)}}
    gram_file = save_grams(tmp_path / "grams.safetensors", grams, info, provenance)
    monkeypatch.setattr(methods_module, "GRAM_ROWS", 5)  # micro: 32 and 128 inputs, so several bands each
    whole, bands = [], []
    real_read, real_rows = SafetensorsFile.read, SafetensorsFile.read_rows
    monkeypatch.setattr(
        SafetensorsFile, "read", lambda self, key: whole.append((self.path, key)) or real_read(self, key)
    )
    monkeypatch.setattr(
        SafetensorsFile,
        "read_rows",
        lambda self, key, start, stop: bands.append(stop - start) or real_rows(self, key, start, stop),
    )
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(source, "regmean", {"alpha": 0.9}, out=out, grams=gram_file)
    assert bands and not [key for path, key in whole if path == gram_file]
    monkeypatch.undo()
    reader, merged, gram_set = open_checkpoint(source), open_checkpoint(out), open_grams(gram_file)
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys})
    solved = [g for g in plan.groups if g.is_linear_weight and len(g.experts) > 1]
    assert solved
    for group in solved:
        ws = [reader.get(e.key).double().numpy() for e in group.experts.values()]
        gs = [gram_set.get(module).numpy() for module in group.gram_keys().values()]
        expected = numpy_regmean(ws, gs, 0.9)
        np.testing.assert_allclose(merged.get(group.target).double().numpy(), expected, rtol=2e-4, atol=2e-5)
