"""Verdicts from tests: a difference planted far outside the noise is reproduced (or contradicted, the
other way round), a zero one equivalent, a noisy one inconclusive; the control gates equivalence only."""

import numpy as np
import pytest

from vlmerge.study.cache import StageOutput
from vlmerge.study.claims import Context, Planned, _non_inferiority, decided_comparisons, family_verdict, score_terms
from vlmerge.study.observations import Observations
from vlmerge.study.plan import PlannedModel, PlannedRun, Stage, StageKind, StudyPlan
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import Comparison, ModelKind, StudyResults, Verdict
from vlmerge.study.stages import EvaluationOutput, MergeabilitySettings, MergeSettings
from vlmerge.study.stats import Estimate, Part, estimate, spearman_interval


def _observations(correct: dict[str, list[np.ndarray]]) -> Observations:
    """Observations of models scored on one classification task, one array of per-example hits per seed."""
    recipe = StudyRecipe.parse(
        {
            "name": "planted",
            "tasks": ["classify_image"],
            "protocols": ["finetune"],
            "claims": ["seed"],
            "random_seeds": list(range(8)),
        }
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


SEEDS = 8


def _context(observations: Observations, control: tuple[Comparison, ...] = ()) -> Context:
    recipe = StudyRecipe.parse(
        {"name": "c", "tasks": ["classify_image"], "protocols": ["finetune"], "random_seeds": list(range(SEEDS))}
    )
    results = StudyResults("c", recipe, ("classify_image",), {}, ("finetune",), {}, control=control)
    return Context(results, observations, recipe)


def _verdict(ctx: Context, a: str, b: str) -> Comparison:
    (found,) = decided_comparisons(ctx, [Planned("finetune", "classify_image", a, b, score_terms(a, b, "finetune"))])
    return found


def test_a_difference_planted_far_outside_the_noise_is_reproduced_a_zero_one_equivalent_a_noisy_one_not():
    rng = np.random.default_rng(0)
    base = [_hits(rng, 0.5) for _ in range(SEEDS)]
    better = [np.where(rng.random(300) < 0.3, 1.0, b) for b in base]  # a third of the misses fixed: ~ +0.15
    same = [b.copy() for b in base]
    noisy = [_hits(rng, 0.5) for _ in range(SEEDS)]  # another model as good as the base
    observations = _observations({"base": base, "better": better, "same": same, "noisy": noisy})
    ctx = _context(observations)

    per_seed, planted = observations.difference("better", "base", "finetune", "classify_image")
    assert per_seed == pytest.approx({s: better[s].mean() - base[s].mean() for s in range(SEEDS)})
    assert planted.mean == pytest.approx(np.mean(list(per_seed.values())))
    found = _verdict(ctx, "better", "base")
    assert found.verdict is Verdict.REPRODUCED and found.headline
    assert found.test.p == pytest.approx(2 / 2**SEEDS)  # every seed's difference positive: the exact minimum
    assert _verdict(ctx, "base", "better").verdict is Verdict.CONTRADICTED
    zero = _verdict(ctx, "same", "base")
    assert (zero.difference.mean, zero.difference.low, zero.difference.high) == (0.0, 0.0, 0.0)
    assert zero.verdict is Verdict.EQUIVALENT
    assert _verdict(ctx, "noisy", "base").verdict is Verdict.INCONCLUSIVE


def _a_model_and_its_copy() -> Observations:
    rng = np.random.default_rng(0)
    base = [_hits(rng, 0.5) for _ in range(SEEDS)]
    return _observations({"base": base, "same": [b.copy() for b in base]})


def _control(gain: Estimate, verdict: Verdict) -> Comparison:
    """The pre-training gain the control measured on the planted task."""
    return Comparison("agnostic-scratch", "no-pretraining", "finetune", "classify_image", {}, gain, verdict)


def test_equivalence_needs_a_protocol_the_control_shows_can_see_pretraining():
    observations = _a_model_and_its_copy()
    blind = _control(Estimate(0, -0.1, 0.1, SEEDS), Verdict.INCONCLUSIVE)
    found = _verdict(_context(observations, (blind,)), "same", "base")
    assert found.verdict is Verdict.INCONCLUSIVE and "no evidence" in found.note
    seeing = _control(Estimate(0.2, 0.1, 0.3, SEEDS), Verdict.REPRODUCED)
    assert _verdict(_context(observations, (seeing,)), "same", "base").verdict is Verdict.EQUIVALENT


def test_a_claim_reads_its_headline_family():
    def c(verdict, headline=True):
        return Comparison("a", "b", "finetune", "mean", {}, Estimate(0, 0, 0, 3), verdict, headline=headline)

    R, C, E, I = Verdict.REPRODUCED, Verdict.CONTRADICTED, Verdict.EQUIVALENT, Verdict.INCONCLUSIVE
    assert family_verdict([c(R), c(I), c(E)]) is R
    assert family_verdict([c(C), c(I)]) is C
    assert family_verdict([c(R), c(C)]) is I  # protocols disagree
    assert family_verdict([c(E), c(I)]) is E
    assert family_verdict([c(I), c(R, headline=False)]) is I  # a per-task row does not decide


@pytest.mark.parametrize(
    "low, high, p, verdict",
    [
        (-0.015, 0.01, 0.01, Verdict.REPRODUCED),
        (-0.015, 0.01, 0.2, Verdict.INCONCLUSIVE),
        (-0.06, -0.03, 0.9, Verdict.CONTRADICTED),
        (-0.03, 0.01, 0.3, Verdict.INCONCLUSIVE),
    ],
)
def test_parity_is_non_inferiority_within_the_margin(low, high, p, verdict):
    assert _non_inferiority(Estimate((low + high) / 2, low, high, 3), p, 0.02) is verdict


def test_a_score_is_the_mean_over_seeds_with_one_interval():
    rng = np.random.default_rng(1)
    hits = [_hits(rng, p) for p in (0.4, 0.5, 0.6)]
    observations = _observations({"m": hits})
    score = observations.score("m", "finetune", "classify_image")
    values = [h.mean() for h in hits]
    assert score.per_seed == pytest.approx(dict(enumerate(values)))
    parts = [[Part.of({"correct": h}, lambda s, axis=-1: np.mean(s["correct"], axis=axis))] for h in hits]
    assert score.estimate == estimate(values, parts)


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


def test_parity_on_a_task_the_control_shows_blind_is_no_evidence():
    observations = _a_model_and_its_copy()
    blind = _control(Estimate(0, -0.1, 0.1, SEEDS), Verdict.EQUIVALENT)
    planned = [Planned("finetune", "classify_image", "same", "base", score_terms("same", "base", "finetune"))]
    (found,) = decided_comparisons(_context(observations, (blind,)), planned, non_inferiority=True)
    assert found.verdict is Verdict.INCONCLUSIVE and "no worse than" in found.note
    (seen,) = decided_comparisons(_context(observations), planned, non_inferiority=True)  # no control to ask
    assert seen.verdict is Verdict.REPRODUCED
