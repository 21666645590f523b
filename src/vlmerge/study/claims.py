"""The paper's claims next to what a study run measured. Each check reads only the study's results;
`holds` is None where this run cannot decide (too few points, or differences within the tolerance)."""

from collections.abc import Callable
from dataclasses import dataclass

from vlmerge.study.results import AGNOSTIC_SCRATCH, NAIVE_MERGE, SEED_MERGE, SPECIFIC, Claim, StudyResults
from vlmerge.study.stats import spearman


@dataclass(frozen=True)
class Verdict:
    compare: tuple[str, ...]  # ids of the models the check read
    holds: bool | None
    finding: str


Check = Callable[[StudyResults, float], Verdict]


def _beats(a: float, b: float, tolerance: float) -> bool | None:
    """True / False when a is above / below b by more than the tolerance; None (undecided) within it."""
    return True if a > b + tolerance else False if a < b - tolerance else None


def _spread_decides(scores: list[float], tolerance: float) -> bool:
    """A sweep whose scores all lie within the tolerance of each other ranks noise, not models."""
    return max(scores) - min(scores) > tolerance


def seed_beats_naive(results: StudyResults, tolerance: float) -> Verdict:
    seeded, naive = results.score(SEED_MERGE), results.score(NAIVE_MERGE)
    return Verdict(
        (SEED_MERGE, NAIVE_MERGE),
        _beats(seeded, naive, tolerance),
        f"seed pre-training + merge scored {seeded:.3f}; naive merging {naive:.3f} "
        f"(a difference within {tolerance:.3f} decides nothing)",
    )


def merge_matches_scratch(results: StudyResults, tolerance: float) -> Verdict:
    merged, scratch = results.score(SEED_MERGE), results.model(AGNOSTIC_SCRATCH)
    return Verdict(
        (SEED_MERGE, AGNOSTIC_SCRATCH),
        merged >= scratch.score - tolerance,
        f"merged {merged:.3f} vs {scratch.label} {scratch.score:.3f} (match means within {tolerance:.3f} or better)",
    )


def longer_seed_helps(results: StudyResults, tolerance: float) -> Verdict:
    sweep = results.sweeps.seed_fraction
    xs, ys = [p.x for p in sweep], [results.score(p.model) for p in sweep]
    rho = spearman(xs, ys)
    points = ", ".join(f"{x:.0%}: {y:.3f}" for x, y in zip(xs, ys))
    holds = None if rho is None or not _spread_decides(ys, tolerance) else rho > 0
    return Verdict(
        tuple(p.model for p in sweep),
        holds,
        f"merged score by seed share {points}; Spearman rho {_rho(rho)} (scores spread "
        f"{max(ys) - min(ys):.3f}; a spread within {tolerance:.3f} decides nothing)",
    )


def metrics_predict_merging(results: StudyResults, tolerance: float) -> Verdict:
    rhos, points = results.mergeability.spearman, results.mergeability.points
    defined = {name: rho for name, rho in rhos.items() if rho is not None}
    negative = [name for name, rho in defined.items() if rho < 0]
    holds = (
        None
        if not defined or not _spread_decides([p.score for p in points], tolerance)
        else len(negative) > len(defined) / 2
    )
    listing = ", ".join(f"{name} {_rho(rho)}" for name, rho in rhos.items())
    return Verdict(
        tuple(p.merged for p in points),
        holds,
        f"rank correlation of each distance with the merged score: {listing or 'no points'}",
    )


def merged_is_smaller(results: StudyResults, tolerance: float) -> Verdict:
    ratio = results.model(SEED_MERGE).parameters / results.model(SPECIFIC).parameters
    return Verdict(
        (SEED_MERGE, SPECIFIC),
        ratio < 0.75,
        f"the merged model has {ratio:.0%} of the modality-specific model's parameters "
        "(embeddings included, which weigh more in small models than at base size)",
    )


def _rho(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:+.2f}"


CLAIMS: list[tuple[str, str, Check]] = [
    (
        "seed",
        "Seed pre-training before modality-specific pre-training is what makes merging work: "
        "seed pre-training + merge beats naive merging.",
        seed_beats_naive,
    ),
    (
        "parity",
        "Merged with this recipe, the modality-agnostic model matches one pre-trained from scratch "
        "at the same total steps.",
        merge_matches_scratch,
    ),
    ("seed_length", "Longer seed pre-training gives a better merged model.", longer_seed_helps),
    (
        "metrics",
        "Weight distances between the experts predict the merge: the closer the experts, the better "
        "the merged model (negative rank correlation).",
        metrics_predict_merging,
    ),
    (
        "size",
        "The merged modality-agnostic model has about half the parameters of the modality-specific one.",
        merged_is_smaller,
    ),
]


def evaluate_claims(results: StudyResults, tolerance: float) -> tuple[Claim, ...]:
    verdicts = [(claim_id, text, check(results, tolerance)) for claim_id, text, check in CLAIMS]
    return tuple(Claim(claim_id, text, v.compare, v.holds, v.finding) for claim_id, text, v in verdicts)
