"""Replication as the test of a verdict: the same recipe on a disjoint set of random seeds, and per claim
whether the two halves agree.

A verdict that is real holds on fresh seeds; one that flips between the halves was decided by the draw.
The second half runs as a study of its own (its own cache, results and report under the first's
directory), so either half can be read alone; `replication.md` and `replication.json` set them side by
side, claim by claim and headline comparison by headline comparison.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmerge.io.atomic import atomic_path
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import Comparison, StudyResults, Verdict

REPLICATE_DIR = "replicate"
MARKDOWN, JSON = "replication.md", "replication.json"


def disjoint_seeds(recipe: StudyRecipe) -> list[int]:
    """As many seeds as the recipe has, each above its largest: no run of the first half repeats."""
    start = max(recipe.random_seeds) + 1
    return list(range(start, start + len(recipe.random_seeds)))


def replicate_recipe(recipe: StudyRecipe, seeds: Sequence[int] | None = None) -> StudyRecipe:
    """The recipe under `seeds` (default: `disjoint_seeds`), validated again; every count of seeds a
    protocol or sweep uses stays as it was."""
    seeds = list(seeds) if seeds is not None else disjoint_seeds(recipe)
    if overlap := sorted(set(seeds) & set(recipe.random_seeds)):
        raise ValueError(f"replicate seeds {overlap} are among the recipe's own {recipe.random_seeds}")
    data = recipe.model_dump(mode="json")
    data["random_seeds"] = seeds
    return StudyRecipe.parse(data, where=f"{recipe.name} on seeds {seeds}")


@dataclass(frozen=True)
class Agreement:
    """One claim (or one of its headline comparisons) under both halves."""

    claim: str
    what: str  # the claim's statement, or the comparison's protocol and task
    first: Verdict
    second: Verdict
    first_text: str = ""  # the difference with its interval, for a comparison
    second_text: str = ""

    @property
    def agree(self) -> bool:
        return self.first is self.second

    def to_json(self) -> dict[str, str | bool]:
        return {
            "claim": self.claim,
            "what": self.what,
            "first": self.first.value,
            "second": self.second.value,
            "first_difference": self.first_text,
            "second_difference": self.second_text,
            "agree": self.agree,
        }


def _interval(c: Comparison) -> str:
    d = c.difference
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def agreements(first: StudyResults, second: StudyResults) -> list[Agreement]:
    """Per claim of both halves, its verdicts, then those of each of its headline comparisons."""
    theirs = {claim.id: claim for claim in second.claims}
    found = []
    for claim in first.claims:
        other = theirs.get(claim.id)
        if other is None:
            continue
        found.append(Agreement(claim.id, claim.paper, claim.verdict, other.verdict))
        by_key = {(c.protocol, c.task): c for c in other.comparisons if c.headline}
        for c in claim.comparisons:
            if c.headline and (match := by_key.get((c.protocol, c.task))) is not None:
                what = f"{c.protocol}, {c.task}" + (f" ({c.label})" if c.label else "")
                found.append(Agreement(claim.id, what, c.verdict, match.verdict, _interval(c), _interval(match)))
    return found


def replication_text(first: StudyResults, second: StudyResults, rows: Sequence[Agreement]) -> str:
    claims = [r for r in rows if not r.first_text]
    split = [r.claim for r in claims if not r.agree]
    lines = [
        f"# Replication of {first.name}",
        "",
        f"The same recipe on random seeds {first.recipe.random_seeds} (first half) and "
        f"{second.recipe.random_seeds} (second half, under `{REPLICATE_DIR}/`). A verdict that is real holds on "
        "fresh seeds.",
        "",
        f"Claims that replicate: {len(claims) - len(split)} of {len(claims)}"
        + (f"; not: {', '.join(split)}." if split else "."),
        "",
        "| claim | what | first half | second half | agree |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        first_cell = f"{r.first.value} {r.first_text}".strip()
        second_cell = f"{r.second.value} {r.second_text}".strip()
        lines.append(f"| {r.claim} | {r.what} | {first_cell} | {second_cell} | {'yes' if r.agree else 'no'} |")
    return "\n".join(lines) + "\n"


def write_replication(study_dir: Path, first: StudyResults, second: StudyResults) -> dict[str, Path]:
    """replication.md and replication.json under the first half's directory."""
    rows = agreements(first, second)
    written = {"markdown": study_dir / MARKDOWN, "json": study_dir / JSON}
    payload = {
        "first_seeds": list(first.recipe.random_seeds),
        "second_seeds": list(second.recipe.random_seeds),
        "agreements": [r.to_json() for r in rows],
    }
    with atomic_path(written["json"]) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    with atomic_path(written["markdown"]) as tmp:
        tmp.write_text(replication_text(first, second, rows), encoding="utf-8")
    return written


def verdicts_agree(rows: Sequence[Agreement]) -> bool:
    return all(r.agree for r in rows if not r.first_text)
