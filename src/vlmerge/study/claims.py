"""The paper's claims, decided: each claim's paired differences per protocol and task, each tested, and a
verdict that reads the tests of its family.

A difference is one interval over seeds and test examples (`stats`), an exact sign-flip test over seeds,
and two one-sided tests against a stated margin (`decisions`). A claim rests on one comparison per
protocol (its headline: the mean over tasks, zero-shot retrieval, the held-out loss); their p-values are
Holm-adjusted together, and the per-task comparisons form a second family of their own. A comparison is
reproduced (or contradicted) when its interval excludes zero on the paper's side (or the other) and its
adjusted p is below 0.05; equivalent when the difference is shown to lie within the margin; inconclusive
otherwise, with the smallest difference the run could detect.

The control (pre-training gain, decided the same way) does not gate a detected difference, which is
detected whatever the control shows. It gates the absence of one: "no difference" (equivalence) and "no
worse" (parity) are decisions only on a task where the control shows pre-training changes the score;
elsewhere they read inconclusive.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from scipy import stats as scipy_stats

from vlmerge.study.decisions import ALPHA, decide, holm, power_line, sign_flip_p, tost_p
from vlmerge.study.observations import HELDOUT, HELDOUT_HEADLINE, Observations, Terms, path_protocol
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import (
    AGNOSTIC_SCRATCH,
    CONTROL,
    MEAN,
    NAIVE_MERGE,
    NAIVE_UNMERGED,
    SEED_MERGE,
    UNMERGED,
    Claim,
    Comparison,
    Decision,
    Group,
    StudyResults,
    Trend,
    Verdict,
)
from vlmerge.study.stats import Correlation, Estimate, spearman, spearman_interval

# Seed pre-training + merge over naive merging in the paper, by our nearest task (points of each metric).
PAPER_SEED_GAINS = {
    "vqa": "+3 (VQAv2)",
    "retrieval": "+7 (COCO), +14 (Flickr30k)",
    "nlvr2": "+25 (NLVR2)",
    "segmentation": "+3 (ADE20k mIoU)",
}
PAPER_SEED_GAIN_VALUES = {"vqa": 0.03, "retrieval": 0.07, "nlvr2": 0.25, "segmentation": 0.03}  # as fractions
PAPER_MEAN_GAIN = 0.03  # the smallest of the paper's gains: the scale a mean over tasks is powered for
PROTOCOL_NOUNS = {
    "finetune": "fine-tuning",
    "probe": "the linear probe",
    "zeroshot": "zero-shot retrieval",
    "heldout": "the held-out objectives",
}
PROTOCOL_NAMES = {
    "finetune": "after fine-tuning",
    "probe": "by linear probe",
    "zeroshot": "zero-shot",
    "heldout": "on held-out pairs",
}
TARGET_RHO = -0.8  # what a useful mergeability metric should reach
LOSS_PROTOCOLS = (HELDOUT,)  # scored by a loss: lower is better


def protocol_name(protocol: str) -> str:
    """How a protocol reads in a sentence: 'after fine-tuning', 'by linear probe', 'zero-shot'."""
    return PROTOCOL_NAMES.get(protocol, protocol)


def better(protocol: str) -> int:
    """+1 where a higher score is better, -1 for a loss: a difference is oriented so positive is better."""
    return -1 if protocol in LOSS_PROTOCOLS or protocol.startswith("path@") else 1


@dataclass(frozen=True)
class Context:
    results: StudyResults
    observations: Observations
    recipe: StudyRecipe

    def headline_task(self, protocol: str) -> str:
        if protocol == HELDOUT:
            return HELDOUT_HEADLINE
        tasks = self.observations.protocol_tasks(protocol)
        return MEAN if MEAN in tasks else tasks[0]

    @cached_property
    def seeing(self) -> dict[tuple[str, str], bool]:
        """Per protocol and task, whether the control shows pre-training changes the score there."""
        return {(c.protocol, c.task): c.verdict is Verdict.REPRODUCED for c in self.results.control}

    def sees(self, protocol: str, task: str) -> bool:
        """Whether a 'no difference' or 'no worse' there can be evidence: the control's gain on that task,
        else on the protocol's headline task; True where the study has no control to ask."""
        found = self.seeing.get((protocol, task), self.seeing.get((protocol, self.headline_task(protocol))))
        return found is not False

    def margin(self, protocol: str) -> float:
        return self.recipe.heldout.margin if protocol == HELDOUT else self.recipe.parity_margin


@dataclass(frozen=True)
class Planned:
    """A comparison before it is tested: the contrast it estimates and what it is tested against."""

    protocol: str
    task: str
    a: str
    b: str
    terms: Terms
    label: str = ""
    paper: str | None = None
    target: float | None = None  # the difference the power line is for (default: the margin)


def score_terms(a: str, b: str, protocol: str) -> Terms:
    """a − b on `protocol`, with a loss's sign turned so that positive favours a."""
    sign = better(protocol)
    return {(a, protocol): float(sign), (b, protocol): float(-sign)}


def score_comparisons(ctx: Context, a: str, b: str, paper: bool = False) -> list[Planned]:
    """a − b on every task (and their mean) under every protocol the recipe evaluates."""
    planned = []
    for protocol in ctx.recipe.protocols:
        for task in ctx.observations.protocol_tasks(protocol):
            gain = PAPER_SEED_GAIN_VALUES.get(task, PAPER_MEAN_GAIN if task == MEAN else None)
            planned.append(
                Planned(
                    protocol,
                    task,
                    a,
                    b,
                    score_terms(a, b, protocol),
                    paper=PAPER_SEED_GAINS.get(task) if paper else None,
                    target=gain if paper and protocol != HELDOUT else None,
                )
            )
    return planned


def decided_comparisons(
    ctx: Context,
    planned: Sequence[Planned],
    direction: int = +1,
    non_inferiority: bool = False,
) -> list[Comparison]:
    """Every planned comparison estimated and decided: the headline of each protocol as one Holm family,
    the rest as another. With `non_inferiority`, reproduced means no worse than the margin (one-sided)."""
    measured = []
    for plan in planned:
        found = ctx.observations.contrast(plan.terms, plan.task)
        if found is not None:
            measured.append((plan, *found))
    headline = [m for m in measured if m[0].task == ctx.headline_task(m[0].protocol)]
    rest = [m for m in measured if m[0].task != ctx.headline_task(m[0].protocol)]
    return [
        *_decided(ctx, headline, direction, non_inferiority, True),
        *_decided(ctx, rest, direction, non_inferiority, False),
    ]


def _decided(ctx: Context, family, direction: int, non_inferiority: bool, headline: bool) -> list[Comparison]:
    if not family:
        return []
    raw = []
    for plan, per_seed, difference in family:
        margin = ctx.margin(plan.protocol)
        if non_inferiority:
            raw.append(_one_sided_p(difference, -margin))
        else:
            raw.append(sign_flip_p(list(per_seed.values())))
    adjusted = holm(raw)
    found = []
    for (plan, per_seed, difference), p, p_adjusted in zip(family, raw, adjusted):
        margin = ctx.margin(plan.protocol)
        target = plan.target or margin
        detectable, needed = power_line(difference.se, difference.seeds, target)
        if non_inferiority:
            verdict = _non_inferiority(difference, float(p_adjusted), margin)
            equivalence = None
        else:
            equivalence = tost_p(difference.mean, difference.se, difference.df, margin)
            verdict = decide((difference.low, difference.high), float(p_adjusted), equivalence, direction)
        note = ""
        absence = verdict is Verdict.EQUIVALENT or (non_inferiority and verdict is Verdict.REPRODUCED)
        if absence and not ctx.sees(plan.protocol, plan.task):
            verdict = Verdict.INCONCLUSIVE
            note = (
                f"{'no worse than' if non_inferiority else 'within'} ±{margin:g}, but the control does not show "
                f"{PROTOCOL_NOUNS.get(plan.protocol, plan.protocol)} ({plan.task}) sees pre-training, so no "
                "difference here is no evidence"
            )
        test = Decision(float(p), float(p_adjusted), len(family), equivalence, margin, detectable, target, needed)
        found.append(
            Comparison(
                plan.a,
                plan.b,
                plan.protocol,
                plan.task,
                per_seed,
                difference,
                verdict,
                plan.paper,
                note,
                plan.label,
                test,
                headline,
            )
        )
    return found


def _one_sided_p(difference: Estimate, bound: float) -> float:
    """p of H0: difference <= bound, by the interval's t (normal with one seed)."""
    if not difference.se:
        return 0.0 if difference.mean > bound else 1.0
    z = (difference.mean - bound) / difference.se
    return float(scipy_stats.norm.sf(z) if difference.seeds < 2 else scipy_stats.t.sf(z, difference.df))


def _non_inferiority(difference: Estimate, adjusted_p: float, margin: float) -> Verdict:
    """Reproduced when shown no worse than -margin (adjusted one-sided p), contradicted when the whole
    interval lies below -margin."""
    if adjusted_p < ALPHA and difference.low > -margin:
        return Verdict.REPRODUCED
    return Verdict.CONTRADICTED if difference.high < -margin else Verdict.INCONCLUSIVE


def family_verdict(comparisons: Sequence[Comparison]) -> Verdict:
    """The claim's verdict from its headline comparisons: a direction where the decided ones agree (Holm
    makes any one of them a family-wise decision), inconclusive where they disagree; otherwise equivalent
    where one is, inconclusive where none is."""
    headline = [c for c in comparisons if c.headline]
    decided = {c.verdict for c in headline} & {Verdict.REPRODUCED, Verdict.CONTRADICTED}
    if len(decided) == 1:
        return decided.pop()
    if decided:
        return Verdict.INCONCLUSIVE
    return Verdict.EQUIVALENT if any(c.verdict is Verdict.EQUIVALENT for c in headline) else Verdict.INCONCLUSIVE


def pretraining_gain(results: StudyResults, observations: Observations, recipe: StudyRecipe) -> tuple[Comparison, ...]:
    """From scratch minus no pre-training: what pre-training adds, per task and protocol."""
    if CONTROL not in results.models:
        return ()
    ctx = Context(results, observations, recipe)
    return tuple(decided_comparisons(ctx, score_comparisons(ctx, AGNOSTIC_SCRATCH, CONTROL)))


def _fmt(estimate: Estimate) -> str:
    return f"{estimate.mean:+.3f} [{estimate.low:+.3f}, {estimate.high:+.3f}]"


def reason(c: Comparison) -> str:
    """One sentence that says why a comparison reads as it does."""
    d, t = c.difference, c.test
    if t is None:
        return f"{_fmt(d)}: {c.verdict.value}"
    tests = f"p = {t.p:.3g}, Holm-adjusted over {t.family}: {t.adjusted_p:.3g}"
    if c.verdict in (Verdict.REPRODUCED, Verdict.CONTRADICTED):
        side = "above" if d.low > 0 else "below"
        if t.tost_p is None:  # non-inferiority
            side = f"above -{t.margin:g}" if c.verdict is Verdict.REPRODUCED else f"below -{t.margin:g}"
            return f"{_fmt(d)} over {d.seeds} seeds, the interval {side} ({tests}): {c.verdict.value}"
        return f"{_fmt(d)} over {d.seeds} seeds, the interval {side} zero ({tests}): {c.verdict.value}"
    if c.verdict is Verdict.EQUIVALENT:
        return (
            f"{_fmt(d)} over {d.seeds} seeds, shown within ±{t.margin:g} (two one-sided tests, p = {t.tost_p:.3g}): "
            "equivalent"
        )
    equivalence = f"; within ±{t.margin:g} not shown (TOST p = {t.tost_p:.3g})" if t.tost_p is not None else ""
    return (
        f"{_fmt(d)} over {d.seeds} seeds ({tests}){equivalence}; the run could detect ±{t.detectable:.3f} "
        f"at 80 % power, and its spread says {t.seeds_needed} seeds would detect {t.target:g}: inconclusive"
        + (f" ({c.note})" if c.note else "")
    )


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _paragraph(ctx: Context, what: str, comparisons: Sequence[Comparison]) -> str:
    """One sentence per headline comparison, then the single tasks that were decided."""
    sentences = []
    for c in comparisons:
        if not c.headline:
            continue
        scope = "mean over tasks" if c.task == MEAN else c.task
        name = c.label or scope
        sentences.append(f"{protocol_name(c.protocol)} ({name}): {reason(c)}")
    if not sentences:
        return f"{what}: not measured."
    text = f"{what}. " + ". ".join(map(capitalised, sentences)) + "."
    decided = [c for c in comparisons if not c.headline and c.verdict is not Verdict.INCONCLUSIVE]
    if decided:
        listed = "; ".join(
            f"{c.task} {protocol_name(c.protocol)} {_fmt(c.difference)} {c.verdict.value}" for c in decided
        )
        text += f" Single tasks and objectives decided (Holm over the claim's {decided[0].test.family}): {listed}."
    return text


def merge_cost(ctx: Context, merged: str, parent: str, weight: float) -> Terms:
    """What a merge loses on held-out pairs: its held-out loss minus its unmerged parent's, times weight."""
    return {(merged, HELDOUT): weight, (parent, HELDOUT): -weight}


def seed_beats_naive(ctx: Context) -> Claim:
    planned = [p for p in score_comparisons(ctx, SEED_MERGE, NAIVE_MERGE, paper=True) if p.protocol != HELDOUT]
    if HELDOUT in ctx.recipe.protocols:
        cost = {**merge_cost(ctx, NAIVE_MERGE, NAIVE_UNMERGED, 1.0), **merge_cost(ctx, SEED_MERGE, UNMERGED, -1.0)}
        for task in ctx.observations.protocol_tasks(HELDOUT):
            planned.append(
                Planned(
                    HELDOUT,
                    task,
                    NAIVE_MERGE,
                    SEED_MERGE,
                    {key: weight * _cost_sign(task) for key, weight in cost.items()},
                    label="what naive merging loses minus what seed + merge loses, each against its own unmerged parent",
                )
            )
    comparisons = decided_comparisons(ctx, planned)
    return Claim(
        "seed",
        "Seed pre-training before modality-specific pre-training is what makes merging work: seed "
        "pre-training + merge beats naive merging.",
        family_verdict(comparisons),
        _paragraph(ctx, "Seed pre-training + merge against naive merging", comparisons),
        tuple(comparisons),
    )


def _cost_sign(task: str) -> int:
    """A loss lost by merging is its rise; an accuracy lost is its fall: both count positive as a loss."""
    return -1 if task.endswith("_correct") else 1


def merge_matches_scratch(ctx: Context) -> Claim:
    comparisons = decided_comparisons(ctx, score_comparisons(ctx, SEED_MERGE, AGNOSTIC_SCRATCH), non_inferiority=True)
    summary = _paragraph(ctx, "Merged minus modality-agnostic from scratch", comparisons)
    summary += (
        f" Parity is read as non-inferiority: reproduced when shown no worse than -{ctx.recipe.parity_margin:g} "
        f"(held-out loss: -{ctx.recipe.heldout.margin:g} nats)."
    )
    return Claim(
        "parity",
        "Merged with this recipe, the modality-agnostic model matches one pre-trained from "
        "scratch at the same total steps.",
        family_verdict(comparisons),
        summary,
        tuple(comparisons),
    )


def barrier_terms(model: str, ratios: Sequence[float], weight: float) -> Terms:
    """The loss barrier at the middle ratio r: L(r) − ((1 − r) L(0) + r L(1)), times weight."""
    middle = min(ratios, key=lambda r: (abs(r - 0.5), r))
    return {
        (model, path_protocol(middle)): weight,
        (model, path_protocol(0)): -weight * (1 - middle),
        (model, path_protocol(1)): -weight * middle,
    }


def barrier_lower_with_seed(ctx: Context) -> Claim:
    ratios = ctx.recipe.heldout.path_ratios
    terms = {**barrier_terms(NAIVE_MERGE, ratios, 1.0), **barrier_terms(SEED_MERGE, ratios, -1.0)}
    planned = [
        Planned(
            HELDOUT,
            task,
            NAIVE_MERGE,
            SEED_MERGE,
            {key: weight * _cost_sign(task) for key, weight in terms.items()},
            label="loss barrier between the experts, naive minus seed + merge",
        )
        for task in ("loss", "itc", "itc_vl", "itm", "mlm")
    ]
    comparisons = decided_comparisons(ctx, planned)
    summary = (
        _paragraph(ctx, "Loss barrier of linear mode connectivity between the experts", comparisons)
        + " The barrier is the held-out loss of the merge at the middle ratio above the straight line between "
        "the two ends of the path (Frankle et al. 2020), per pair; each end is a single-expert model (every "
        "modality through the language or the vision expert), so a path whose ends are poor has a low barrier. "
        + _path_shape(ctx)
    )
    return Claim(
        "barrier",
        "Seed pre-training lowers the loss barrier between the experts (they stay linearly connected).",
        family_verdict(comparisons),
        summary,
        tuple(comparisons),
    )


def _path_shape(ctx: Context) -> str:
    """The held-out loss at the ends and the middle of each path, so the barrier reads against levels."""
    by_model: dict[str, dict[float, Estimate]] = {}
    for point in ctx.results.path:
        by_model.setdefault(point.model, {})[point.ratio] = point.loss
    parts = []
    for model, losses in by_model.items():
        ratios = sorted(losses)
        middle = min(ratios, key=lambda r: (abs(r - 0.5), r))
        ends = ", ".join(f"{losses[r].mean:.2f} at ratio {r:g}" for r in (ratios[0], middle, ratios[-1]))
        parts.append(f"{ctx.results.models[model].label if model in ctx.results.models else model}: {ends}")
    return ("Held-out loss along the paths: " + "; ".join(parts) + ".") if parts else ""


def _rho_text(c: Correlation) -> str:
    return "undefined" if c.rho is None else f"{c.rho:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"


def _spearman_p(x: Sequence[float], y: Sequence[float]) -> float:
    if spearman(x, y) is None:
        return 1.0
    return float(scipy_stats.spearmanr(x, y).pvalue)


def decided_trends(trends: Sequence[tuple[Trend, int]]) -> list[Trend]:
    """Trends with their Spearman p Holm-adjusted together; each decided on its interval and adjusted p."""
    adjusted = holm([t.p if t.p is not None else 1.0 for t, _ in trends]) if trends else []
    found = []
    for (trend, direction), p_adjusted in zip(trends, adjusted):
        c = trend.correlation
        if c.rho is None:
            verdict = Verdict.INCONCLUSIVE
        else:
            verdict = decide((c.low, c.high), float(p_adjusted), None, direction)
        found.append(replace(trend, verdict=verdict, adjusted_p=float(p_adjusted)))
    return found


def _trend_sentences(trends: Sequence[Trend]) -> str:
    return " ".join(
        f"{capitalised(t.name)} {protocol_name(t.protocol)}: {_rho_text(t.correlation)} over "
        f"{t.correlation.points} runs (Holm-adjusted p {t.adjusted_p:.3g}), {t.verdict.value}."
        for t in trends
    )


def _trend_verdict(trends: Sequence[Trend]) -> Verdict:
    decided = {t.verdict for t in trends} - {Verdict.INCONCLUSIVE}
    return decided.pop() if len(decided) == 1 else Verdict.INCONCLUSIVE


def longer_seed_helps(ctx: Context) -> Claim:
    raw = []
    models = [ctx.results.model(p.model) for p in ctx.results.sweeps.seed_fraction]
    for protocol in ctx.recipe.protocols:
        task = ctx.headline_task(protocol)
        points = [
            (m.seed_fraction, value)
            for m in models
            if (score := m.score(protocol, task))
            for value in score.per_seed.values()
        ]
        x, y = [a for a, _ in points], [b for _, b in points]
        trend = Trend(
            f"seed fraction vs {task}", protocol, spearman_interval(x, y), Verdict.INCONCLUSIVE, _spearman_p(x, y)
        )
        raw.append((trend, better(protocol)))
    trends = decided_trends(raw)
    summary = (
        "Spearman rho of the seed share with the merged model's headline score (models x seeds; the held-out "
        "loss falls as the merge gets better). " + _trend_sentences(trends)
    )
    return Claim(
        "seed_length",
        "Longer seed pre-training gives a better merged model.",
        _trend_verdict(trends),
        summary,
        trends=tuple(trends),
    )


def metrics_predict_merging(ctx: Context) -> Claim:
    points = ctx.results.mergeability.points
    raw = []
    for protocol, correlations in ctx.results.mergeability.correlations.items():
        for metric, correlation in correlations.items():
            chosen = [p for p in points if protocol in p.retention]
            x = [p.metrics[metric] for p in chosen]
            y = [p.retention[protocol] for p in chosen]
            trend = Trend(
                f"{metric.label} vs retention", protocol, correlation, Verdict.INCONCLUSIVE, _spearman_p(x, y)
            )
            raw.append((trend, -1, metric))
    model_level = [(t, d) for t, d, metric in raw if metric.layers is None]
    decided = {t.name + t.protocol: t for t in decided_trends(model_level)}
    trends = [decided.get(t.name + t.protocol, t) for t, _, _ in raw]
    deciding = [t for t, (_, _, metric) in zip(trends, raw) if metric.layers is None]
    on_target = [
        f"{t.name.split(' vs ')[0]} {protocol_name(t.protocol)}"
        for t in deciding
        if t.correlation.rho is not None and t.correlation.rho <= TARGET_RHO and t.correlation.high < 0
    ]
    summary = (
        f"Spearman rho of each distance between the experts with what merging keeps (merged minus unmerged "
        f"score; held-out: unmerged minus merged loss), over {len(points)} modality-specific runs (models x "
        f"seeds); the model-level distances are one Holm family. "
        + _trend_sentences(deciding)
        + f" Target: rho <= {TARGET_RHO} with the interval below zero; met by {', '.join(on_target) or 'none'}."
    )
    return Claim(
        "metrics",
        "Weight distances between the experts predict the merge: the closer the experts, the "
        "less merging loses (negative rank correlation).",
        _trend_verdict(deciding),
        summary,
        trends=tuple(trends),
    )


def merged_is_smaller(ctx: Context) -> Claim:
    ratio = ctx.results.model(SEED_MERGE).parameters / ctx.results.model(UNMERGED).parameters
    verdict = Verdict.REPRODUCED if ratio < 0.75 else Verdict.CONTRADICTED
    return Claim(
        "size",
        "The merged modality-agnostic model has about half the parameters of the modality-specific one.",
        verdict,
        f"The merged model has {ratio:.0%} of the modality-specific model's parameters "
        "(embeddings included, which weigh more in small models than at base size); exact, no interval.",
    )


def method_differences(
    results: StudyResults, observations: Observations, recipe: StudyRecipe
) -> tuple[Comparison, ...]:
    """Each compared merge method minus the main merge, on every protocol's headline task, paired by seed and
    test example and decided like a claim's comparisons (one Holm family over methods and protocols):
    reproduced reads better than the main merge, contradicted worse."""
    ctx = Context(results, observations, recipe)
    methods = [m for m in results.models.values() if Group.METHODS in m.groups and m.id != SEED_MERGE]
    planned = [
        Planned(protocol, ctx.headline_task(protocol), m.id, SEED_MERGE, score_terms(m.id, SEED_MERGE, protocol))
        for m in methods
        for protocol in recipe.protocols
        if ctx.observations.protocol_tasks(protocol)
    ]
    return tuple(decided_comparisons(ctx, planned))


CLAIMS: dict[str, Callable[[Context], Claim]] = {
    "seed": seed_beats_naive,
    "parity": merge_matches_scratch,
    "barrier": barrier_lower_with_seed,
    "seed_length": longer_seed_helps,
    "metrics": metrics_predict_merging,
    "size": merged_is_smaller,
}


def evaluate_claims(results: StudyResults, observations: Observations, recipe: StudyRecipe) -> tuple[Claim, ...]:
    ctx = Context(results, observations, recipe)
    return tuple(CLAIMS[claim_id](ctx) for claim_id in recipe.claims)
