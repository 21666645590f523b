"""Replication: the same recipe on disjoint seeds, and per claim whether the halves agree."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from vlmerge.cli.main import main
from vlmerge.study.recipe import StudyRecipe, load_recipe
from vlmerge.study.replication import agreements, disjoint_seeds, replicate_recipe, verdicts_agree, write_replication
from vlmerge.study.results import Claim, Comparison, StudyResults, Verdict
from vlmerge.study.stats import Estimate

RECIPES = Path(__file__).parents[2] / "recipes"


def test_the_second_half_runs_on_as_many_fresh_seeds():
    recipe = StudyRecipe.parse({"name": "r", "random_seeds": [0, 5, 2], "protocols": ["finetune", "zeroshot"]})
    assert disjoint_seeds(recipe) == [6, 7, 8]
    second = replicate_recipe(recipe)
    assert second.random_seeds == [6, 7, 8] and second.protocols == recipe.protocols
    with pytest.raises(ValueError, match=r"\[5\]"):
        replicate_recipe(recipe, [5, 9, 10])
    demo = load_recipe(RECIPES / "emoji-demo.yaml")
    assert set(replicate_recipe(demo).random_seeds).isdisjoint(demo.random_seeds)
    assert replicate_recipe(demo).protocol_seeds == demo.protocol_seeds


def _results(recipe: StudyRecipe, seed_verdict: Verdict, loss: float) -> StudyResults:
    comparison = Comparison(
        "naive-merge", "seed-merge", "heldout", "loss", {}, Estimate(loss, loss - 0.01, loss + 0.01, 8), seed_verdict
    )
    claims = (
        Claim("seed", "seed beats naive", seed_verdict, "", (replace(comparison, headline=True),)),
        Claim("size", "half the parameters", Verdict.REPRODUCED, ""),
    )
    return StudyResults(recipe.name, recipe, (), {}, tuple(recipe.protocols), {}, claims=claims)


def test_the_halves_are_set_side_by_side_claim_by_claim(tmp_path):
    recipe = StudyRecipe.parse({"name": "r", "random_seeds": [0, 1]})
    first = _results(recipe, Verdict.REPRODUCED, 0.05)
    same = _results(replicate_recipe(recipe), Verdict.REPRODUCED, 0.04)
    rows = agreements(first, same)
    assert [(r.claim, r.agree) for r in rows] == [("seed", True), ("seed", True), ("size", True)]
    assert verdicts_agree(rows)
    flipped = _results(replicate_recipe(recipe), Verdict.INCONCLUSIVE, 0.001)
    rows = agreements(first, flipped)
    assert not verdicts_agree(rows)
    written = write_replication(tmp_path, first, flipped)
    text = written["markdown"].read_text()
    assert "Claims that replicate: 1 of 2; not: seed." in text
    assert "| seed | heldout, loss | reproduced +0.050 [+0.040, +0.060] | inconclusive +0.001" in text
    payload = json.loads(written["json"].read_text())
    assert payload["first_seeds"] == [0, 1] and payload["second_seeds"] == [2, 3]
    assert [a["agree"] for a in payload["agreements"]] == [False, False, True]


TINY = {
    "name": "tiny-replicate",
    "random_seeds": [0],
    "data": {"image_size": 32, "limit": 200},
    "model": {"size": "micro"},
    "tokenizer": {"vocab_size": 300},
    "pretrain_optimizer": {"batch_size": 8, "lr": 2.0e-3, "warmup_steps": 1},
    "total_steps": 4,
    "checkpoint_every": 4,
    "seed_fractions": [0.0, 0.5],
    "architectures": ["all"],
    "protocols": ["heldout"],
    "heldout": {"path_ratios": [0.0, 0.5, 1.0]},
    "tasks": ["retrieval"],
    "claims": ["seed", "barrier", "size"],
    "specific_steps": [1, 2, 3],
    "merges": [{"method": "arithmetic", "adamerge": {"steps": 2, "batch_size": 4, "checkpoint_every": 1}}],
    "control": False,
    "gallery_size": 0,
}


def test_replicate_runs_a_second_study_on_fresh_seeds_and_writes_the_comparison(emoji_sources, tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    assert main(["study", str(tmp_path / "recipe.yaml"), "--out", str(out), "--replicate", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "replicating on random seeds [1]" in printed
    first = json.loads((out / "results.json").read_text())
    second = json.loads((out / "replicate" / "results.json").read_text())
    assert list(first["models"]["seed-merge"]["checkpoints"]) == ["0"]
    assert list(second["models"]["seed-merge"]["checkpoints"]) == ["1"]
    assert [(d["condition"], d["steps"]) for d in first["dose"]] == [("naive", [1, 2, 3]), ("seed", [1, 2, 3])]
    learnt = next(m for m in first["models"].values() if m["options"] == {} and m["method"] == "arithmetic")
    assert set(learnt["scores"]) == {"heldout"}
    assert learnt["merge_label"].startswith("arithmetic (adamerge={")  # named apart from plain arithmetic
    assert "| arithmetic (adamerge={" in (out / "report.md").read_text()
    payload = json.loads((out / "replication.json").read_text())
    assert {a["claim"] for a in payload["agreements"]} == {"seed", "barrier", "size"}
    assert (out / "replication.md").read_text().startswith("# Replication of tiny-replicate")
