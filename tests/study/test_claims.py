"""Verdicts from intervals: a difference planted far outside the noise is reproduced (or contradicted,
the other way round), a zero difference is inconclusive; intervals checked against closed forms."""

import math

import numpy as np
import pytest

from vlmerge.study.cache import StageOutput
from vlmerge.study.claims import Context, direction_verdict, non_inferiority_verdict
from vlmerge.study.observations import Observations
from vlmerge.study.plan import PlannedModel, PlannedRun, Stage, StageKind, StudyPlan
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import Comparison, ModelKind, StudyResults, Verdict
from vlmerge.study.stages import EvaluationOutput, MergeabilitySettings, MergeSettings
from vlmerge.study.stats import Estimate, estimate, seed_interval, spearman_interval

T_975 = {1: math.tan(math.pi * 0.475), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025)}  # closed forms of Student's t


def test_the_seed_interval_is_students_t_over_the_seeds():
    for values in ([0.31, 0.35], [0.31, 0.35, 0.30]):
        n = len(values)
        half = T_975[n - 1] * np.std(values, ddof=1) / math.sqrt(n)
        low, high = seed_interval(values)
        assert (low, high) == pytest.approx((np.mean(values) - half, np.mean(values) + half), rel=1e-9)
    assert seed_interval([0.3]) is None


def test_the_example_interval_is_the_bootstrap_of_the_test_set_error():
    rng = np.random.default_rng(3)
    per_seed = [(rng.random(400) < 0.7).astype(float) for _ in range(3)]
    parts = [[({"correct": c}, lambda s, axis=-1: np.mean(s["correct"], axis=axis))] for c in per_seed]
    result = estimate([c.mean() for c in per_seed], parts)
    # The normal approximation: the mean of 3 independent means of 400 Bernoulli draws.
    normal = 1.96 * math.sqrt(sum(c.var() / len(c) for c in per_seed)) / 3
    assert result.example_half_width == pytest.approx(normal, rel=0.15)
    assert result.half_width == pytest.approx(max(result.example_half_width, result.seed_half_width))


@pytest.mark.parametrize(
    "low, high, verdict",
    [(0.01, 0.05, Verdict.REPRODUCED), (-0.05, -0.01, Verdict.CONTRADICTED), (-0.01, 0.05, Verdict.INCONCLUSIVE)],
)
def test_a_direction_claim_reads_which_side_of_zero_the_interval_lies(low, high, verdict):
    assert direction_verdict(Estimate((low + high) / 2, low, high, 3, None, None), +1) is verdict


@pytest.mark.parametrize(
    "low, high, verdict",
    [(-0.015, 0.01, Verdict.REPRODUCED), (-0.06, -0.03, Verdict.CONTRADICTED), (-0.03, 0.01, Verdict.INCONCLUSIVE)],
)
def test_parity_is_non_inferiority_within_the_margin(low, high, verdict):
    assert non_inferiority_verdict(Estimate((low + high) / 2, low, high, 3, None, None), 0.02) is verdict


def _observations(correct: dict[str, list[np.ndarray]]) -> Observations:
    """Observations of models scored on one classification task, one array of per-example hits per seed."""
    recipe = StudyRecipe.parse(
        {"name": "planted", "tasks": ["classify_image"], "protocols": ["finetune"], "claims": ["seed"]}
    )
    models, outputs = {}, {}
    for model_id, per_seed in correct.items():
        runs = []
        for seed, hits in enumerate(per_seed):
            checkpoint = Stage(StageKind.MERGE, MergeSettings(method=model_id, options={"seed": seed}))
            stage = Stage(StageKind.FINETUNE, MergeabilitySettings(), {"model": checkpoint})
            result = EvaluationOutput(metrics={"accuracy": float(hits.mean())}, samples={"correct": hits.tolist()})
            outputs[stage.key] = StageOutput(None, result, 0.0, False)
            runs.append(PlannedRun(seed, checkpoint, {"finetune": {"classify_image": stage}}, None))
        models[model_id] = PlannedModel(model_id, model_id, ModelKind.MERGED, (), 0.5, "all", None, None, tuple(runs))
    return Observations(StudyPlan(recipe, (), models, None), outputs)


def _hits(rng: np.random.Generator, p: float, n: int = 300) -> np.ndarray:
    return (rng.random(n) < p).astype(float)


def test_a_difference_planted_far_outside_the_noise_is_reproduced_and_a_zero_one_is_not():
    rng = np.random.default_rng(0)
    base = [_hits(rng, 0.5) for _ in range(3)]
    better = [np.where(rng.random(300) < 0.3, 1.0, b) for b in base]  # a third of the misses fixed: ~ +0.15
    same = [b.copy() for b in base]
    noisy = [_hits(rng, 0.5) for _ in range(3)]  # another model as good as the base
    observations = _observations({"base": base, "better": better, "same": same, "noisy": noisy})

    per_seed, planted = observations.difference("better", "base", "finetune", "classify_image")
    assert per_seed == pytest.approx({s: better[s].mean() - base[s].mean() for s in range(3)})
    assert planted.mean == pytest.approx(np.mean([better[s].mean() - base[s].mean() for s in range(3)]))
    assert direction_verdict(planted, +1) is Verdict.REPRODUCED
    assert direction_verdict(observations.difference("base", "better", "finetune", "classify_image")[1], +1) is (
        Verdict.CONTRADICTED
    )
    zero = observations.difference("same", "base", "finetune", "classify_image")[1]
    assert (zero.mean, zero.low, zero.high) == (0.0, 0.0, 0.0)
    assert direction_verdict(zero, +1) is Verdict.INCONCLUSIVE
    assert direction_verdict(observations.difference("noisy", "base", "finetune", "classify_image")[1], +1) is (
        Verdict.INCONCLUSIVE
    )


def test_a_score_is_the_mean_over_seeds_with_the_wider_interval():
    rng = np.random.default_rng(1)
    hits = [_hits(rng, p) for p in (0.4, 0.5, 0.6)]
    score = _observations({"m": hits}).score("m", "finetune", "classify_image")
    values = [h.mean() for h in hits]
    assert score.per_seed == pytest.approx(dict(enumerate(values)))
    seed_half = T_975[2] * np.std(values, ddof=1) / math.sqrt(3)
    assert score.estimate.seed_half_width == pytest.approx(seed_half)
    assert score.estimate.half_width == pytest.approx(max(seed_half, score.estimate.example_half_width))
    assert score.estimate.source == "seeds"  # three seeds this far apart move more than the test set


def test_scores_on_different_test_examples_are_not_paired():
    rng = np.random.default_rng(2)
    observations = _observations({"a": [_hits(rng, 0.5, 300)], "b": [_hits(rng, 0.5, 200)]})
    with pytest.raises(Exception, match="different test examples"):
        observations.difference("a", "b", "finetune", "classify_image")


def test_spearman_has_a_bootstrap_interval_that_excludes_zero_only_for_a_clear_trend():
    x = list(range(12))
    clear = spearman_interval(x, [v + 0.1 * (v % 3) for v in x])
    assert clear.rho > 0.9 and clear.excludes_zero() == 1
    flat = spearman_interval(x, [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0, 1.0, 0.45])
    assert flat.excludes_zero() == 0
    assert spearman_interval([1, 2], [1, 2]).rho is None


class _Tasks:
    """Observations as far as a claim's context reads them: which tasks each protocol scored."""

    def protocol_tasks(self, protocol):
        return ["retrieval"] if protocol == "zeroshot" else ["vqa", "retrieval", "mean"]


def _gain(protocol, task, low, high):
    verdict = direction_verdict(Estimate((low + high) / 2, low, high, 3, None, None), +1)
    return Comparison(
        "agnostic-scratch", "no-pretraining", protocol, task, {}, Estimate(0, low, high, 3, None, None), verdict
    )


def test_a_claim_is_read_on_the_first_protocol_the_control_shows_can_see_pretraining():
    recipe = StudyRecipe.parse({"name": "c", "protocols": ["finetune", "probe", "zeroshot"], "claims": ["seed"]})
    blind_finetune = (
        _gain("finetune", "mean", -0.01, 0.05),
        _gain("probe", "mean", -0.02, 0.04),
        _gain("zeroshot", "retrieval", 0.01, 0.05),
    )
    ctx = Context(
        StudyResults("c", recipe, (), {}, tuple(recipe.protocols), {}, control=blind_finetune), _Tasks(), recipe
    )
    assert ctx.blind == {("finetune", "mean"), ("probe", "mean")}
    assert ctx.deciding_protocol == "zeroshot" and "fine-tuning blind to pre-training" in ctx.deciding_note()
    seeing = (_gain("finetune", "mean", 0.01, 0.05),)
    ctx = Context(StudyResults("c", recipe, (), {}, tuple(recipe.protocols), {}, control=seeing), _Tasks(), recipe)
    assert ctx.deciding_protocol == "finetune" and ctx.deciding_note() == ""
