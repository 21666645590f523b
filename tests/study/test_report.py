"""The study report on hand-made study results: numbers from results, verdicts, escaping, images, HTML."""

import dataclasses
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.report import fmt, interval, write_report
from vlmerge.study.results import (
    MEAN,
    Claim,
    Comparison,
    Decision,
    GalleryEntry,
    GalleryHit,
    Group,
    Mergeability,
    MergeabilityPoint,
    MetricName,
    ModelKind,
    ModelResult,
    StudyResults,
    SweepPoint,
    Sweeps,
    TaskScore,
    Timing,
    Trend,
    Verdict,
)
from vlmerge.study.stats import Correlation, Estimate

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _estimate(mean, half, seeds=3):
    return Estimate(mean, mean - half, mean + half, seeds, half / 4.3)


def _score(metric, values, half, metrics=None):
    per_seed = dict(enumerate(values))
    return TaskScore(metric, per_seed, _estimate(sum(values) / len(values), half, len(values)), metrics or {})


def _model(model_id, label, groups, kind, fraction, method, options, params, zero_shot, retrieval, vqa):
    finetune = {
        "retrieval": _score(
            "mean_recall",
            [retrieval - 0.01, retrieval, retrieval + 0.01],
            0.02,
            {"i2t_r1": retrieval / 2, "mean_recall": retrieval},
        ),
        "vqa": _score("vqa_score", [vqa - 0.02, vqa, vqa + 0.02], 0.04, {"vqa_score": vqa, "accuracy": vqa + 0.01}),
    }
    finetune[MEAN] = _score("mean of primary metrics", [(retrieval + vqa) / 2 + d for d in (-0.01, 0.0, 0.01)], 0.03)
    scores = {"finetune": finetune}
    if zero_shot is not None:
        scores["zeroshot"] = {"retrieval": _score("mean_recall", [zero_shot] * 3, 0.01, {"mean_recall": zero_shot})}
    return ModelResult(
        id=model_id,
        label=label,
        kind=ModelKind(kind),
        groups=tuple(map(Group, groups)),
        seed_fraction=fraction,
        placement="all",
        method=method,
        options=options,
        checkpoints={seed: f"cache/{model_id}-{seed}/model.safetensors" for seed in range(3)},
        parameters=params,
        scores=scores,
    )


MODELS = [
    _model(
        "agnostic-scratch",
        "modality-agnostic from scratch",
        ["baselines"],
        "agnostic",
        1.0,
        None,
        {},
        98469,
        0.081,
        0.123,
        0.404,
    ),
    _model(
        "specific",
        "modality-specific (not merged)",
        ["baselines"],
        "specific",
        0.5,
        None,
        {},
        174501,
        None,
        0.131,
        0.422,
    ),
    _model(
        "naive-merge",
        "naive merge (no seed)",
        ["baselines", "seed_length"],
        "merged",
        0.0,
        "interpolation",
        {"ratio": 0.5},
        98469,
        0.032,
        0.051,
        0.303,
    ),
    _model(
        "seed-merge",
        "interpolation r=0.5",
        ["baselines", "methods", "seed_length"],
        "merged",
        0.5,
        "interpolation",
        {"ratio": 0.5},
        98469,
        0.072,
        0.114,
        0.391,
    ),
    _model(
        "no-pretraining",
        "no pre-training (random weights)",
        ["control"],
        "control",
        0.0,
        None,
        {},
        98469,
        0.02,
        0.09,
        0.35,
    ),
    _model(
        "regmean",
        "RegMean alpha=0.9",
        ["methods"],
        "merged",
        0.5,
        "regmean",
        {"alpha": 0.9},
        98469,
        0.077,
        0.117,
        0.396,
    ),
    _model(
        "seed-merge-r0.25",
        "interpolation r=0.25",
        ["methods"],
        "merged",
        0.5,
        "interpolation",
        {"ratio": 0.25},
        98469,
        0.066,
        0.108,
        0.377,
    ),
]


def _comparison(a, b, protocol, task, mean, half, verdict, paper=None, note=""):
    headline = task == MEAN or protocol == "zeroshot" or a == "agnostic-scratch" and task == "vqa"
    test = Decision(0.25, 0.5, 2, 0.125, 0.02, 0.0625, 0.03, 12)
    return Comparison(
        a,
        b,
        protocol,
        task,
        {0: mean - 0.01, 1: mean, 2: mean + 0.01},
        _estimate(mean, half),
        Verdict(verdict),
        paper,
        note,
        test=test,
        headline=headline,
    )


SEED_COMPARISONS = (
    _comparison("seed-merge", "naive-merge", "finetune", "retrieval", 0.063, 0.02, "reproduced", "+7 (COCO)"),
    _comparison("seed-merge", "naive-merge", "finetune", "vqa", 0.088, 0.05, "reproduced", "+3 (VQAv2)"),
    _comparison("seed-merge", "naive-merge", "finetune", MEAN, 0.0755, 0.03, "reproduced"),
    _comparison(
        "seed-merge",
        "naive-merge",
        "zeroshot",
        "retrieval",
        0.04,
        0.05,
        "inconclusive",
        note="the control shows no detectable gain",
    ),
)
PARITY_COMPARISONS = (_comparison("seed-merge", "agnostic-scratch", "finetune", MEAN, -0.011, 0.004, "contradicted"),)
CORRELATION = Correlation(-0.987, -1.0, -0.6, 6)

RESULTS = StudyResults(
    name="micro-study",
    recipe=StudyRecipe.parse(
        {
            "name": "micro-study",
            "total_steps": 40,
            "seed_fraction": 0.5,
            "seed_fractions": [0.0, 0.5],
            "random_seeds": [0, 1, 2],
        }
    ),
    tasks=("retrieval", "vqa"),
    primary_metrics={"retrieval": "mean_recall", "vqa": "vqa_score"},
    protocols=("finetune", "zeroshot"),
    models={model.id: model for model in MODELS},
    control=(
        _comparison("agnostic-scratch", "no-pretraining", "finetune", "vqa", 0.054, 0.02, "reproduced"),
        _comparison("agnostic-scratch", "no-pretraining", "zeroshot", "retrieval", 0.061, 0.07, "inconclusive"),
    ),
    sweeps=Sweeps(
        # deliberately out of order: the report sorts numeric sweeps by x
        seed_fraction=(SweepPoint(0.5, "seed-merge"), SweepPoint(0.0, "naive-merge")),
        interpolation_ratio=(SweepPoint(0.25, "seed-merge-r0.25"), SweepPoint(0.5, "seed-merge")),
    ),
    mergeability=Mergeability(
        points=(
            MergeabilityPoint(
                "specific",
                "seed-merge",
                0,
                0.5,
                "all",
                {MetricName("l2"): 3.14, MetricName("cosine"): 0.052, MetricName("ssd"): 0.301},
                {"finetune": -0.024},
            ),
            MergeabilityPoint(
                "specific-seed0-all",
                "naive-merge",
                0,
                0.0,
                "all",
                {MetricName("l2"): 9.02, MetricName("cosine"): 0.41, MetricName("ssd"): 0.452},
                {"finetune": -0.107},
            ),
        ),
        correlations={
            "finetune": {
                MetricName("l2"): CORRELATION,
                MetricName("cosine"): Correlation(-0.5, -1.0, 0.4, 6),
                MetricName("ssd"): Correlation(None, None, None, 6),
            }
        },
    ),
    claims=(
        Claim(
            "seed",
            "Seed pre-training + merge beats naive merging.",
            Verdict.REPRODUCED,
            "seed + merge beats naive merging by 0.076 on the mean",
            SEED_COMPARISONS,
        ),
        Claim(
            "parity",
            "The merged model matches one pre-trained from scratch.",
            Verdict.CONTRADICTED,
            "merged is worse by more than the margin",
            PARITY_COMPARISONS,
        ),
        Claim(
            "seed_length",
            "Longer seed pre-training gives a better merged model.",
            Verdict.INCONCLUSIVE,
            "two points",
            trends=(
                Trend(
                    "seed fraction vs mean score", "finetune", Correlation(None, None, None, 2), Verdict.INCONCLUSIVE
                ),
            ),
        ),
    ),
    gallery=(
        GalleryEntry(
            "gallery/query-0.png",
            "grinning face",
            (
                GalleryHit("grinning face", 0.912, True),
                GalleryHit("smiling face", 0.803, False),
                GalleryHit("cat face", 0.5, False),
            ),
        ),
        GalleryEntry("gallery/query-1.png", "red heart", (GalleryHit("blue heart", 0.7, False),)),
    ),
    timing=Timing(seconds=61.23, stages_run=14, stages_cached=3, stage_seconds=58.4),
)


def _with_model(results: StudyResults, model_id: str, **changes) -> StudyResults:
    models = {**results.models, model_id: dataclasses.replace(results.models[model_id], **changes)}
    return dataclasses.replace(results, models=models)


def _study(tmp_path: Path, results: StudyResults) -> tuple[dict[str, Path], str, str]:
    (tmp_path / "gallery").mkdir()
    for i, color in enumerate(["yellow", "red"]):
        Image.new("RGB", (16, 16), color).save(tmp_path / "gallery" / f"query-{i}.png")
    paths = write_report(tmp_path, results)
    return paths, paths["markdown"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report of RESULTS shared by the tests that only read it (plots take a second or two)."""
    study_dir = tmp_path_factory.mktemp("study")
    return (study_dir, *_study(study_dir, RESULTS))


def _md(text: str) -> str:
    """Brackets as the markdown renderer escapes them."""
    return text.replace("[", "\\[").replace("]", "\\]")


def _row(markdown: str, first_cell: str, after: str = "") -> str:
    """The first table row starting with `first_cell` below the heading `after`."""
    text = markdown[markdown.index(after) :] if after else markdown
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def test_markdown_has_every_model_and_its_numbers(report):
    _, _, markdown, _ = report
    for model in RESULTS.models.values():
        full_row = _row(markdown, model.label, "## Full results")
        assert f"| {fmt(model.score('finetune', 'vqa').metrics['accuracy'])} |" in full_row
    scratch = RESULTS.model("agnostic-scratch")
    cells = [interval(scratch.score("finetune", t).estimate) for t in ("retrieval", "vqa", MEAN)]
    assert _row(markdown, "modality-agnostic from scratch", "## Baselines") == _md(
        f"| modality-agnostic from scratch | agnostic | 98,469 | {' | '.join(cells)} | 3 |"
    )
    assert cells[0] == "0.123 [0.103, 0.143]" and cells[1] == "0.404 [0.364, 0.444]"
    regmean = _row(markdown, "RegMean alpha=0.9", "## Merging methods")
    assert regmean.startswith(_md("| RegMean alpha=0.9 | regmean | alpha=0.9 | 0.117 [0.097, 0.137] | 0.396 ["))
    assert "Wall time 61.2 s; stages run: 14, taken from the cache: 3." in markdown


NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def test_every_number_in_a_table_comes_from_results(report):
    _, _, markdown, _ = report
    allowed: set[str] = set()

    def collect(value):
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            allowed.add(fmt(value))

    collect(RESULTS.to_json())
    cells = [c.strip() for line in markdown.splitlines() if line.startswith("| ") for c in line.strip("|").split(" | ")]
    numeric = [c for c in cells if re.fullmatch(rf"{NUMBER}( \\\[{NUMBER}, {NUMBER}\\\])?", c)]
    numbers = [n for c in numeric for n in re.findall(NUMBER, c)]
    assert any("[" in c for c in numeric) and set(numbers) <= allowed


def test_claim_verdicts_and_their_paragraphs(report):
    _, _, markdown, html = report
    verdicts = {c.id: _row(markdown, c.id, "## Paper vs this run").rsplit("|", 2)[1].strip() for c in RESULTS.claims}
    assert verdicts == {"seed": "reproduced", "parity": "contradicted", "seed_length": "inconclusive"}
    assert "parity: contradicted. merged is worse by more than the margin" in markdown
    assert "<td>contradicted</td>" in html
    vqa = _row(markdown, "seed (per task)", "| claim | compared |")
    row = "| after fine-tuning | retrieval | 0.063 [0.043, 0.083] | 3 | 0.250 | 0.500 (of 2) | 0.125 (±0.020) | 0.062 |"
    assert _md(row + " +7 (COCO) | reproduced |") in vqa


def test_the_control_says_where_a_protocol_cannot_separate_pretraining(report):
    _, _, markdown, _ = report
    section = markdown[markdown.index("## Pre-training gain") : markdown.index("## Baselines")]
    assert "Protocols not shown to see pre-training: zero-shot." in section
    assert "reads inconclusive" in section
    assert _md("| after fine-tuning | vqa | 0.054 [0.034, 0.074] | 3 | reproduced |") in section
    baselines = markdown[markdown.index("## Baselines") : markdown.index("## Merging methods")]
    assert "| no pre-training (random weights) | control |" in baselines


def test_numeric_sweeps_are_sorted_and_unknown_models_named(tmp_path):
    ratios = (*RESULTS.sweeps.interpolation_ratio, SweepPoint(0.75, "never-ran"))
    results = dataclasses.replace(RESULTS, sweeps=dataclasses.replace(RESULTS.sweeps, interpolation_ratio=ratios))
    _, markdown, _ = _study(tmp_path, results)
    section = markdown[markdown.index("## Seed pre-training length") : markdown.index("## Interpolation ratio")]
    assert section.index("| 0.000 | naive merge") < section.index("| 0.500 | interpolation r=0.5")
    assert "![Merged score vs seed fraction" in section
    assert "Listed in the sweep but missing from the models: never-ran." in markdown


def test_mergeability_null_rho_is_na(report):
    _, _, markdown, _ = report
    assert _row(markdown, "ssd", "## Mergeability") == "| ssd | n/a | 6 | no |"
    assert _row(markdown, "l2", "## Mergeability") == _md("| l2 | -0.987 [-1.000, -0.600] | 6 | yes |")


def test_labels_are_escaped(tmp_path):
    results = _with_model(RESULTS, "regmean", label="<b>& | x")
    _, markdown, html = _study(tmp_path, results)
    assert "&lt;b&gt;&amp; | x" in html and "<b>" not in html
    assert "\\<b\\>& \\| x" in markdown


def _referenced_images(markdown: str, html: str) -> set[str]:
    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sources: set[str] = set()

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.sources.add(dict(attrs)["src"])

    parser = Images()
    parser.feed(html)
    from_markdown = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown))
    assert from_markdown == parser.sources
    return from_markdown


def test_every_referenced_image_is_a_png_on_disk(report):
    study_dir, paths, markdown, html = report
    images = _referenced_images(markdown, html)
    assert images == {
        f"plots/{name}.png"
        for name in ["forest", "methods", "seed_fraction", "interpolation_ratio", "mergeability-finetune", "gallery"]
    }
    for relative in images:
        data = (study_dir / relative).read_bytes()
        assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE)
    assert all(path.is_file() for path in paths.values())


class _TagChecker(HTMLParser):
    """Fails on a closing tag that does not match the open one, and remembers what stays open."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_is_a_well_formed_standalone_page(report):
    _, _, _, html = report
    checker = _TagChecker()
    checker.feed(html)
    checker.close()
    assert checker.stack == []
    assert '<meta charset="utf-8">' in html and "<style>" in html
    assert not checker.tags & {"script", "link", "iframe"} and "http" not in html


def test_absent_sections_are_said_absent(tmp_path):
    models = {
        m.id: dataclasses.replace(m, groups=tuple(g for g in m.groups if g is Group.BASELINES))
        for m in RESULTS.models.values()
    }
    results = StudyResults(
        RESULTS.name,
        StudyRecipe.parse({"name": RESULTS.name}),
        RESULTS.tasks,
        RESULTS.primary_metrics,
        RESULTS.protocols,
        models,
    )
    paths, markdown, html = _study(tmp_path, results)
    for what in [
        "claims",
        "control",
        "merging methods",
        "seed fraction sweep",
        "interpolation ratio sweep",
        "architecture sweep",
        "mergeability points",
        "retrieval gallery",
    ]:
        assert f"Not part of this recipe: results.json has no {what}." in markdown
    assert set(paths) == {"markdown", "html"} and not (tmp_path / "plots").exists()
    assert "Wall time n/a s" in markdown and "<img" not in html
    assert "| modality-agnostic from scratch | agnostic | 98,469 |" in markdown


def test_missing_gallery_image_is_reported(tmp_path):
    lost = dataclasses.replace(RESULTS.gallery[1], image="gallery/lost.png")
    results = dataclasses.replace(RESULTS, gallery=(RESULTS.gallery[0], lost))
    _, markdown, _ = _study(tmp_path, results)
    assert "Query images not found in the study directory: gallery/lost.png." in markdown
    assert "| gallery/lost.png | red heart | blue heart (0.700, wrong) | - | - |" in markdown


def test_without_matplotlib_plots_ask_for_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ConfigError, match=r"vlmerge\[report\]"):
        write_report(tmp_path, RESULTS)


def test_the_scale_note_names_the_datasets_and_the_start_the_recipe_used(tmp_path):
    recipe = {
        **RESULTS.recipe.model_dump(exclude_defaults=True),
        "init": "pretrained",
        "model": {"size": "small-p14"},
        "tasks": ["retrieval", "vqa"],
        "data": {"dataset": ["tuxpaint", "emoji"]},
        "finetune": {"steps": 20},
        "task_data": {"retrieval": {"dataset": "tuxpaint"}, "vqa": {"dataset": "easy_vqa"}},
    }
    results = dataclasses.replace(RESULTS, recipe=StudyRecipe.parse(recipe))
    markdown = _study(tmp_path, results)[1]
    assert (
        "starting from the pretrained ViT-S/14, pre-trained for 40 steps in all on tuxpaint + emoji image-text "
        "pairs, then fine-tuned for 20 steps per task (retrieval on tuxpaint, vqa on easy_vqa)"
    ) in markdown
