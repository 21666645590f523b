"""The paper's claims next to what a study run measured. Each check reads only results.json
values; `holds` is None where this run cannot decide (too few points)."""

from collections.abc import Callable
from typing import Any

from vlmerge.study.stats import spearman

Results = dict[str, Any]


def _score(results: Results, model_id: str) -> float | None:
    model = results["models"].get(model_id)
    return None if model is None else model["score"]


def _beats(a: float, b: float, tolerance: float) -> bool | None:
    """True / False when a is above / below b by more than the tolerance; None (undecided) within it."""
    return True if a > b + tolerance else False if a < b - tolerance else None


def _spread_decides(scores: list[float], tolerance: float) -> bool:
    """A sweep whose scores all lie within the tolerance of each other ranks noise, not models."""
    return max(scores) - min(scores) > tolerance


def seed_beats_naive(results: Results, tolerance: float) -> dict[str, Any]:
    seeded, naive = _score(results, "seed-merge"), _score(results, "naive-merge")
    return {"compare": ["seed-merge", "naive-merge"], "holds": _beats(seeded, naive, tolerance),
            "finding": f"seed pre-training + merge scored {seeded:.3f}; naive merging {naive:.3f} "
                       f"(a difference within {tolerance:.3f} decides nothing)"}


def merge_matches_scratch(results: Results, tolerance: float) -> dict[str, Any]:
    merged, scratch = _score(results, "seed-merge"), _score(results, "agnostic-scratch")
    return {"compare": ["seed-merge", "agnostic-scratch"], "holds": merged >= scratch - tolerance,
            "finding": f"merged {merged:.3f} vs {results['models']['agnostic-scratch']['label']} {scratch:.3f} "
                       f"(match means within {tolerance:.3f} or better)"}


def longer_seed_helps(results: Results, tolerance: float) -> dict[str, Any]:
    sweep = results["sweeps"]["seed_fraction"]
    xs, ys = [p["x"] for p in sweep], [_score(results, p["model"]) for p in sweep]
    rho = spearman(xs, ys)
    points = ", ".join(f"{x:.0%}: {y:.3f}" for x, y in zip(xs, ys))
    holds = None if rho is None or not _spread_decides(ys, tolerance) else rho > 0
    return {"compare": [p["model"] for p in sweep], "holds": holds,
            "finding": f"merged score by seed share {points}; Spearman rho {_rho(rho)} (scores spread "
                       f"{max(ys) - min(ys):.3f}; a spread within {tolerance:.3f} decides nothing)"}


def metrics_predict_merging(results: Results, tolerance: float) -> dict[str, Any]:
    rhos = results["mergeability"]["spearman"]
    defined = {name: rho for name, rho in rhos.items() if rho is not None}
    negative = [name for name, rho in defined.items() if rho < 0]
    scores = [p["score"] for p in results["mergeability"]["points"]]
    holds = None if not defined or not _spread_decides(scores, tolerance) else len(negative) > len(defined) / 2
    listing = ", ".join(f"{name} {_rho(rho)}" for name, rho in rhos.items())
    return {"compare": [p["merged"] for p in results["mergeability"]["points"]], "holds": holds,
            "finding": f"rank correlation of each distance with the merged score: {listing or 'no points'}"}


def merged_is_smaller(results: Results, tolerance: float) -> dict[str, Any]:
    merged, specific = results["models"]["seed-merge"], results["models"]["specific"]
    ratio = merged["parameters"] / specific["parameters"]
    return {"compare": ["seed-merge", "specific"], "holds": ratio < 0.75,
            "finding": f"the merged model has {ratio:.0%} of the modality-specific model's parameters "
                       "(embeddings included, which weigh more in small models than at base size)"}


def _rho(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:+.2f}"


CLAIMS: list[tuple[str, str, Callable[[Results, float], dict[str, Any]]]] = [
    ("seed", "Seed pre-training before modality-specific pre-training is what makes merging work: "
             "seed pre-training + merge beats naive merging.", seed_beats_naive),
    ("parity", "Merged with this recipe, the modality-agnostic model matches one pre-trained from scratch "
               "at the same total steps.", merge_matches_scratch),
    ("seed_length", "Longer seed pre-training gives a better merged model.", longer_seed_helps),
    ("metrics", "Weight distances between the experts predict the merge: the closer the experts, the better "
                "the merged model (negative rank correlation).", metrics_predict_merging),
    ("size", "The merged modality-agnostic model has about half the parameters of the modality-specific one.",
     merged_is_smaller),
]


def evaluate_claims(results: Results, tolerance: float) -> list[dict[str, Any]]:
    return [{"id": claim_id, "paper": text, **check(results, tolerance)} for claim_id, text, check in CLAIMS]
