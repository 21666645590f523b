"""The study report on hand-made study results: numbers from results, verdicts, escaping, images, HTML."""

import dataclasses
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.study.report import fmt, write_report
from vlmerge.study.results import (
    Claim,
    GalleryEntry,
    GalleryHit,
    Group,
    Mergeability,
    MergeabilityPoint,
    ModelKind,
    ModelResult,
    StudyResults,
    SweepPoint,
    Sweeps,
    Timing,
)

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _model(model_id, label, groups, kind, fraction, method, options, params, zero_shot, retrieval, vqa, score):
    tasks = {
        "retrieval": {"i2t_r1": retrieval / 2, "mean_recall": retrieval},
        "vqa": {"vqa_score": vqa, "accuracy": vqa + 0.01},
    }
    return ModelResult(
        id=model_id,
        label=label,
        kind=ModelKind(kind),
        groups=tuple(map(Group, groups)),
        seed_fraction=fraction,
        placement="all",
        method=method,
        options=options,
        checkpoint=f"cache/{model_id}/model.safetensors",
        parameters=params,
        zero_shot=zero_shot,
        tasks=tasks,
        score=score,
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
        {"mean_recall": 0.081},
        0.123,
        0.404,
        0.2634,
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
        0.2766,
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
        {"mean_recall": 0.032},
        0.051,
        0.303,
        0.177,
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
        {"mean_recall": 0.072},
        0.114,
        0.391,
        0.2527,
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
        {"mean_recall": 0.077},
        0.117,
        0.396,
        0.2567,
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
        {"mean_recall": 0.066},
        0.108,
        0.377,
        0.2426,
    ),
]

RESULTS = StudyResults(
    name="micro-study",
    recipe={"name": "micro-study", "total_steps": 40, "seed_fraction": 0.5, "seed_fractions": [0.0, 0.5]},
    tasks=("retrieval", "vqa"),
    primary_metrics={"retrieval": "mean_recall", "vqa": "vqa_score"},
    models={model.id: model for model in MODELS},
    sweeps=Sweeps(
        # deliberately out of order: the report sorts numeric sweeps by x
        seed_fraction=(SweepPoint(0.5, "seed-merge"), SweepPoint(0.0, "naive-merge")),
        interpolation_ratio=(SweepPoint(0.25, "seed-merge-r0.25"), SweepPoint(0.5, "seed-merge")),
    ),
    mergeability=Mergeability(
        points=(
            MergeabilityPoint(
                "specific", "seed-merge", 0.5, "all", {"l2": 3.14, "cosine": 0.052, "ssd": 0.301}, 0.2527
            ),
            MergeabilityPoint(
                "specific-seed0", "naive-merge", 0.0, "all", {"l2": 9.02, "cosine": 0.41, "ssd": 0.452}, 0.177
            ),
        ),
        spearman={"l2": -0.987, "cosine": -0.5, "ssd": None},
    ),
    claims=(
        Claim(
            "seed",
            "Seed pre-training + merge beats naive merging.",
            ("seed-merge", "naive-merge"),
            True,
            "seed + merge scored 0.253 vs 0.177 for naive merging",
        ),
        Claim(
            "parity",
            "The merged model matches one pre-trained from scratch.",
            ("seed-merge", "agnostic-scratch"),
            False,
            "merged 0.253 vs from scratch 0.264",
        ),
        Claim(
            "seed_length",
            "Longer seed pre-training gives a better merged model.",
            ("naive-merge", "seed-merge"),
            None,
            "two points; Spearman rho n/a",
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


def _row(markdown: str, first_cell: str, after: str = "") -> str:
    """The first table row starting with `first_cell` below the heading `after`."""
    text = markdown[markdown.index(after) :] if after else markdown
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def test_markdown_has_every_model_and_its_numbers(report):
    _, _, markdown, _ = report
    for model in RESULTS.models.values():
        full_row = _row(markdown, model.label, "## Full results")
        assert full_row.endswith(f"| {fmt(model.score)} |")
        assert f"| {fmt(model.tasks['vqa']['accuracy'])} |" in full_row
    scratch = _row(markdown, "modality-agnostic from scratch", "## Baselines")
    assert scratch == "| modality-agnostic from scratch | agnostic | 0.123 | 0.404 | 0.263 | 98,469 |"
    regmean = _row(markdown, "RegMean alpha=0.9", "## Merging methods")
    assert regmean == "| RegMean alpha=0.9 | regmean | alpha=0.9 | 0.077 | 0.117 | 0.396 | 0.257 |"
    assert "Wall time 61.2 s; stages run: 14, taken from the cache: 3." in markdown


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
    numbers = [c for c in cells if re.fullmatch(r"-?[\d,]+(\.\d+)?", c)]
    assert numbers and set(numbers) <= allowed


def test_claim_verdicts_and_where_the_run_differs(report):
    _, _, markdown, html = report
    verdicts = {c.id: _row(markdown, c.paper).rsplit("|", 2)[1].strip() for c in RESULTS.claims}
    assert verdicts == {"seed": "reproduced", "parity": "not reproduced", "seed_length": "inconclusive"}
    assert "This run differs from the paper on: parity (merged 0.253 vs from scratch 0.264)." in markdown
    assert "<td>not reproduced</td>" in html


def test_numeric_sweeps_are_sorted_and_unknown_models_named(tmp_path):
    ratios = (*RESULTS.sweeps.interpolation_ratio, SweepPoint(0.75, "never-ran"))
    results = dataclasses.replace(RESULTS, sweeps=dataclasses.replace(RESULTS.sweeps, interpolation_ratio=ratios))
    _, markdown, _ = _study(tmp_path, results)
    section = markdown[markdown.index("## Seed pre-training length") : markdown.index("## Interpolation ratio")]
    assert section.index("| 0.000 | naive merge") < section.index("| 0.500 | interpolation r=0.5")
    assert "Listed in the sweep but missing from the models: never-ran." in markdown


def test_mergeability_null_rho_is_na(report):
    _, _, markdown, _ = report
    assert _row(markdown, "ssd", "## Mergeability") == "| ssd | n/a |"
    assert _row(markdown, "l2", "## Mergeability") == "| l2 | -0.987 |"


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
        f"plots/{name}.png" for name in ["methods", "seed_fraction", "interpolation_ratio", "mergeability", "gallery"]
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
    results = StudyResults(RESULTS.name, {"name": RESULTS.name}, RESULTS.tasks, RESULTS.primary_metrics, models)
    paths, markdown, html = _study(tmp_path, results)
    for what in [
        "claims",
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
    assert "| modality-agnostic from scratch | agnostic |" in markdown


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
        **RESULTS.recipe,
        "init": "pretrained",
        "model": {"size": "small-p14"},
        "tasks": ["retrieval", "vqa"],
        "data": {"dataset": ["tuxpaint", "emoji"]},
        "finetune": {"steps": 20},
        "task_data": {"retrieval": {"dataset": "tuxpaint"}, "vqa": {"dataset": "easy_vqa"}},
    }
    results = dataclasses.replace(RESULTS, recipe=recipe)
    markdown = _study(tmp_path, results)[1]
    assert (
        "starting from the pretrained ViT-S/14, pre-trained for 40 steps in all on tuxpaint + emoji image-text "
        "pairs, then fine-tuned for 20 steps per task (retrieval on tuxpaint, vqa on easy_vqa)"
    ) in markdown
