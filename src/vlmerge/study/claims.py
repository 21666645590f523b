"""The paper's claims, decided by intervals: each claim's comparisons per task and protocol, its trends,
and a verdict that reads them. A comparison is reproduced when its 95 % interval excludes zero in the
paper's direction, contradicted when it excludes zero the other way, and inconclusive otherwise; the
interval's half-width is the smallest difference the run could have told apart from zero.
"""

from collections.abc import Callable
from dataclasses import dataclass

from vlmerge.study.observations import Observations
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import (
    AGNOSTIC_SCRATCH,
    CONTROL,
    MEAN,
    NAIVE_MERGE,
    SEED_MERGE,
    UNMERGED,
    Claim,
    Comparison,
    StudyResults,
    Trend,
    Verdict,
)
from vlmerge.study.stats import Correlation, Estimate, spearman_interval

PAPER_PROTOCOL = "finetune"
# Seed pre-training + merge over naive merging in the paper, by our nearest task (points of each metric).
PAPER_SEED_GAINS = {
    "vqa": "+3 (VQAv2)",
    "retrieval": "+7 (COCO), +14 (Flickr30k)",
    "nlvr2": "+25 (NLVR2)",
    "classify_image": "+3 (ADE20k segmentation, the nearest vision-only task)",
}
PAPER_SEED_GAIN_VALUES = {"vqa": 0.03, "retrieval": 0.07, "nlvr2": 0.25, "classify_image": 0.03}  # as fractions
PROTOCOL_NOUNS = {"finetune": "fine-tuning", "probe": "the linear probe", "zeroshot": "zero-shot retrieval"}
PROTOCOL_NAMES = {"finetune": "after fine-tuning", "probe": "by linear probe", "zeroshot": "zero-shot"}
TARGET_RHO = -0.8  # what a useful mergeability metric should reach


def protocol_name(protocol: str) -> str:
    """How a protocol reads in a sentence: 'after fine-tuning', 'by linear probe', 'zero-shot'."""
    return PROTOCOL_NAMES.get(protocol, protocol)


@dataclass(frozen=True)
class Context:
    results: StudyResults
    observations: Observations
    recipe: StudyRecipe

    def headline_task(self, protocol: str) -> str:
        tasks = self.observations.protocol_tasks(protocol)
        return MEAN if MEAN in tasks else tasks[0]

    @property
    def blind(self) -> set[tuple[str, str]]:
        """(protocol, task) pairs on which the control shows no pre-training gain."""
        return {(c.protocol, c.task) for c in self.results.control if c.verdict is not Verdict.REPRODUCED}

    @property
    def deciding_protocol(self) -> str:
        """The paper's protocol, unless the control shows it blind to pre-training on its headline task:
        then the first protocol of the recipe that is not."""
        protocols = self.recipe.protocols
        ordered = [PAPER_PROTOCOL, *protocols] if PAPER_PROTOCOL in protocols else list(protocols)
        seeing = [p for p in ordered if (p, self.headline_task(p)) not in self.blind]
        return (seeing or ordered)[0]

    def deciding_note(self) -> str:
        deciding = self.deciding_protocol
        main = PAPER_PROTOCOL if PAPER_PROTOCOL in self.recipe.protocols else self.recipe.protocols[0]
        if deciding == main:
            return ""
        return (
            f" The verdict is read {protocol_name(deciding)}: the control shows "
            f"{PROTOCOL_NOUNS.get(main, main)} blind to pre-training here."
        )


def direction_verdict(interval: Estimate | Correlation, paper_sign: int) -> Verdict:
    """Which side of zero a difference's (or a correlation's) interval lies on, against the paper's sign."""
    side = interval.excludes_zero()
    return Verdict.INCONCLUSIVE if side == 0 else Verdict.REPRODUCED if side == paper_sign else Verdict.CONTRADICTED


def non_inferiority_verdict(difference: Estimate, margin: float) -> Verdict:
    """Parity as non-inferiority: no worse than `margin` (contradicted: worse by more than it, for sure)."""
    if difference.low > -margin:
        return Verdict.REPRODUCED
    return Verdict.CONTRADICTED if difference.high < -margin else Verdict.INCONCLUSIVE


def compare(
    ctx: Context,
    a: str,
    b: str,
    judge: Callable[[Estimate], Verdict],
    paper: dict[str, str] | None = None,
    blind: set[tuple[str, str]] = frozenset(),
) -> tuple[Comparison, ...]:
    """a − b on every task (and their mean) under every protocol both models were evaluated by.

    Where the control shows no pre-training gain (`blind`), the protocol cannot tell pre-training
    conditions apart on that task: the comparison is inconclusive whatever its interval, and says so."""
    found = []
    for protocol in ctx.recipe.protocols:
        for task in ctx.observations.protocol_tasks(protocol):
            paired = ctx.observations.difference(a, b, protocol, task)
            if paired is None:
                continue
            per_seed, difference = paired
            verdict, note = judge(difference), ""
            if (protocol, task) in blind:
                note = (
                    "the control shows no pre-training gain here, so this protocol cannot separate pre-training "
                    f"conditions (the interval alone reads {verdict.value})"
                )
                verdict = Verdict.INCONCLUSIVE
            found.append(Comparison(a, b, protocol, task, per_seed, difference, verdict, (paper or {}).get(task), note))
    return tuple(found)


def pretraining_gain(results: StudyResults, observations: Observations, recipe: StudyRecipe) -> tuple[Comparison, ...]:
    """From scratch minus no pre-training: what pre-training adds, per task and protocol."""
    if CONTROL not in results.models:
        return ()
    ctx = Context(results, observations, recipe)
    return compare(ctx, AGNOSTIC_SCRATCH, CONTROL, lambda d: direction_verdict(d, +1))


def _fmt(estimate: Estimate) -> str:
    return f"{estimate.mean:+.3f} [{estimate.low:+.3f}, {estimate.high:+.3f}]"


def _headline(ctx: Context, comparisons: tuple[Comparison, ...]) -> Comparison | None:
    protocol = ctx.deciding_protocol
    task = ctx.headline_task(protocol)
    return next((c for c in comparisons if (c.protocol, c.task) == (protocol, task)), None)


def _paragraph(ctx: Context, what: str, comparisons: tuple[Comparison, ...]) -> str:
    """One sentence per protocol (on its headline task), then the single tasks an interval decided."""
    sentences = []
    for protocol in ctx.recipe.protocols:
        task = ctx.headline_task(protocol)
        c = next((c for c in comparisons if (c.protocol, c.task) == (protocol, task)), None)
        if c is None:
            continue
        d, scope = c.difference, "mean over tasks" if task == MEAN else task
        sentence = (
            f"{protocol_name(protocol)} ({scope}): {_fmt(d)} over {d.seeds} seed(s), interval from "
            f"{d.source}, nothing smaller than ±{d.half_width:.3f} detectable: {c.verdict.value}"
        )
        sentences.append(sentence + (f"; {c.note}" if c.note else ""))
    if not sentences:
        return f"{what}: not measured."
    text = f"{what}. " + ". ".join(map(_capitalised, sentences)) + "."
    decided = [c for c in comparisons if c.task != MEAN and c.verdict is not Verdict.INCONCLUSIVE]
    if decided:
        listed = "; ".join(
            f"{c.task} {protocol_name(c.protocol)} {_fmt(c.difference)} {c.verdict.value}" for c in decided
        )
        text += f" Single tasks decided: {listed}."
    return text


def seed_beats_naive(ctx: Context) -> Claim:
    comparisons = compare(
        ctx, SEED_MERGE, NAIVE_MERGE, lambda d: direction_verdict(d, +1), PAPER_SEED_GAINS, blind=ctx.blind
    )
    headline = _headline(ctx, comparisons)
    return Claim(
        "seed",
        "Seed pre-training before modality-specific pre-training is what makes merging work: seed "
        "pre-training + merge beats naive merging.",
        headline.verdict if headline else Verdict.INCONCLUSIVE,
        _paragraph(ctx, "Seed pre-training + merge minus naive merging", comparisons) + ctx.deciding_note(),
        comparisons,
    )


def merge_matches_scratch(ctx: Context) -> Claim:
    margin = ctx.recipe.parity_margin
    comparisons = compare(
        ctx, SEED_MERGE, AGNOSTIC_SCRATCH, lambda d: non_inferiority_verdict(d, margin), blind=ctx.blind
    )
    headline = _headline(ctx, comparisons)
    summary = _paragraph(ctx, "Merged minus modality-agnostic from scratch", comparisons) + ctx.deciding_note()
    summary += f" Parity is read as non-inferiority: reproduced when the interval lies above -{margin:.3f}."
    return Claim(
        "parity",
        "Merged with this recipe, the modality-agnostic model matches one pre-trained from "
        "scratch at the same total steps.",
        headline.verdict if headline else Verdict.INCONCLUSIVE,
        summary,
        comparisons,
    )


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _rho_text(c: Correlation) -> str:
    return "undefined" if c.rho is None else f"{c.rho:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"


def _trend_sentences(trends: list[Trend]) -> str:
    return " ".join(
        f"{_capitalised(protocol_name(t.protocol))}: {_rho_text(t.correlation)} over "
        f"{t.correlation.points} runs, {t.verdict.value}."
        for t in trends
    )


def longer_seed_helps(ctx: Context) -> Claim:
    trends = []
    models = [ctx.results.model(p.model) for p in ctx.results.sweeps.seed_fraction]
    for protocol in ctx.recipe.protocols:
        task = ctx.headline_task(protocol)
        points = [
            (m.seed_fraction, value)
            for m in models
            if (score := m.score(protocol, task))
            for value in score.per_seed.values()
        ]
        correlation = spearman_interval([x for x, _ in points], [y for _, y in points])
        trends.append(
            Trend(f"seed fraction vs {task} score", protocol, correlation, direction_verdict(correlation, +1))
        )
    headline = next((t for t in trends if t.protocol == ctx.deciding_protocol), None)
    summary = (
        "Spearman rho of the seed share with the merged score (models x seeds, each protocol on its mean "
        "over tasks). " + _trend_sentences(trends) + ctx.deciding_note()
    )
    return Claim(
        "seed_length",
        "Longer seed pre-training gives a better merged model.",
        headline.verdict if headline else Verdict.INCONCLUSIVE,
        summary,
        trends=tuple(trends),
    )


def metrics_predict_merging(ctx: Context) -> Claim:
    by_metric = [
        (metric, Trend(f"{metric.label} vs retention", protocol, correlation, direction_verdict(correlation, -1)))
        for protocol, correlations in ctx.results.mergeability.correlations.items()
        for metric, correlation in correlations.items()
    ]
    trends = [t for _, t in by_metric]
    model_level = [(metric.family, t) for metric, t in by_metric if metric.layers is None]
    deciding = [t for _, t in model_level if t.protocol == ctx.deciding_protocol]
    decided = {t.verdict for t in deciding} - {Verdict.INCONCLUSIVE}
    verdict = decided.pop() if len(decided) == 1 else Verdict.INCONCLUSIVE
    on_target = [
        f"{family} {protocol_name(t.protocol)}"
        for family, t in model_level
        if t.correlation.rho is not None and t.correlation.rho <= TARGET_RHO and t.correlation.high < 0
    ]
    by_protocol = []
    for protocol in ctx.results.mergeability.correlations:
        listing = "; ".join(
            f"{family} {_rho_text(t.correlation)}" for family, t in model_level if t.protocol == protocol
        )
        by_protocol.append(f"{protocol_name(protocol)}: {listing}")
    summary = (
        f"Spearman rho of each distance with what merging keeps (merged minus unmerged score), over "
        f"{len(ctx.results.mergeability.points)} modality-specific runs (models x seeds). "
        + ". ".join(map(_capitalised, by_protocol))
        + ". "
        f"Target: rho <= {TARGET_RHO} with the interval below zero; met by {', '.join(on_target) or 'none'}."
        + ctx.deciding_note()
    )
    return Claim(
        "metrics",
        "Weight distances between the experts predict the merge: the closer the experts, the "
        "less merging loses (negative rank correlation).",
        verdict,
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


CLAIMS: dict[str, Callable[[Context], Claim]] = {
    "seed": seed_beats_naive,
    "parity": merge_matches_scratch,
    "seed_length": longer_seed_helps,
    "metrics": metrics_predict_merging,
    "size": merged_is_smaller,
}


def evaluate_claims(results: StudyResults, observations: Observations, recipe: StudyRecipe) -> tuple[Claim, ...]:
    ctx = Context(results, observations, recipe)
    return tuple(CLAIMS[claim_id](ctx) for claim_id in recipe.claims)
