"""Claim verdicts: a difference or a sweep within the recipe's tolerance decides nothing."""

import pytest

from vlmerge.study.claims import longer_seed_helps, metrics_predict_merging, seed_beats_naive
from vlmerge.study.results import (
    Mergeability,
    MergeabilityPoint,
    ModelKind,
    ModelResult,
    StudyResults,
    SweepPoint,
    Sweeps,
)


def _model(model_id: str, score: float) -> ModelResult:
    return ModelResult(
        model_id, model_id, ModelKind.MERGED, (), 0.5, "all", "interpolation", {}, "", 1, None, {}, score
    )


def results(scores: dict[str, float], sweep: list[tuple[float, str]] = (), rhos: dict | None = None) -> StudyResults:
    points = tuple(MergeabilityPoint(m, m, x, "all", {}, scores[m]) for x, m in sweep)
    return StudyResults(
        "claims",
        {},
        (),
        {},
        {name: _model(name, score) for name, score in scores.items()},
        Sweeps(seed_fraction=tuple(SweepPoint(x, model) for x, model in sweep)),
        Mergeability(points, rhos or {}),
    )


@pytest.mark.parametrize("seeded, naive, holds", [(0.50, 0.40, True), (0.40, 0.50, False), (0.405, 0.40, None)])
def test_seed_beats_naive_only_by_more_than_the_tolerance(seeded, naive, holds):
    assert seed_beats_naive(results({"seed-merge": seeded, "naive-merge": naive}), 0.01).holds is holds


@pytest.mark.parametrize(
    "scores, holds",
    [
        ([0.30, 0.35, 0.40], True),  # rises by more than the tolerance
        ([0.40, 0.35, 0.30], False),  # falls
        ([0.300, 0.303, 0.306], None),  # perfectly ordered, but all within the tolerance: noise
    ],
)
def test_seed_length_needs_a_spread_beyond_the_tolerance(scores, holds):
    models = [f"m{i}" for i in range(len(scores))]
    sweep = list(zip([0.0, 0.5, 0.75], models))
    claim = longer_seed_helps(results(dict(zip(models, scores)), sweep), 0.01)
    assert claim.holds is holds
    assert f"{max(scores) - min(scores):.3f}" in claim.finding


def test_metrics_claim_holds_with_a_majority_of_negative_correlations_and_a_real_spread():
    sweep = [(0.0, "a"), (0.5, "b")]
    rhos = {"l2": -0.8, "cosine": -0.5, "ssd": 0.2}
    assert metrics_predict_merging(results({"a": 0.3, "b": 0.4}, sweep, rhos), 0.01).holds is True
    assert metrics_predict_merging(results({"a": 0.3, "b": 0.305}, sweep, rhos), 0.01).holds is None
    assert metrics_predict_merging(results({"a": 0.3, "b": 0.4}, sweep, {"l2": None}), 0.01).holds is None
