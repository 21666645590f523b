"""The study report: results.json as markdown and a standalone HTML page, with PNG plots.

Every number shown is read from the study's results (results.json); nothing is recomputed here.
The report is built once as a list of blocks (heading, paragraph, table, image) and rendered to
both formats, so they cannot drift apart. A section whose data is absent says so instead of failing.
"""

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vlmerge.io.atomic import atomic_path
from vlmerge.study import plots
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.results import GalleryHit, Group, ModelResult, StudyResults, SweepPoint

VERDICTS = {True: "reproduced", False: "not reproduced", None: "inconclusive"}
SCALE_NOTE = (
    "These are small-scale runs: {size}-sized models{start} pre-trained for {steps} steps in all on "
    "{pairs} image-text pairs, then fine-tuned for {finetune} steps per task ({tasks}). The paper pre-trains "
    "base-size models on millions of web image-text pairs and evaluates on COCO, Flickr30k, VQAv2 and "
    "NLVR2. Absolute numbers are not comparable with the paper's; what can be compared is the direction "
    "of each comparison, and a small run can miss effects that only appear at scale."
)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class Image:
    path: str  # relative to the study directory, POSIX separators
    alt: str


Block = Heading | Paragraph | Table | Image


def fmt(value: Any, decimals: int = 3) -> str:
    """The one number format of the report: floats to 3 decimals, integers with thousands separators."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def _md(text: str) -> str:
    """One line, with the characters that would start markup or raw HTML, or end a table cell, escaped."""
    text = " ".join(str(text).split())
    for char in "\\`*[]<>|":
        text = text.replace(char, "\\" + char)
    return text


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(map(_md, cells)) + " |"


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured markdown; images by path relative to the study directory."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines.append(f"{'#' * block.level} {_md(block.text)}")
        elif isinstance(block, Paragraph):
            lines.append(_md(block.text))
        elif isinstance(block, Table):
            rule = "|" + " --- |" * len(block.header)
            lines.append("\n".join([_md_row(block.header), rule, *map(_md_row, block.rows)]))
        else:
            lines.append(f"![{_md(block.alt)}]({quote(block.path)})")
    return "\n\n".join(lines) + "\n"


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;font-size:.9rem;font-variant-numeric:tabular-nums}"
    "th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}th{background:#f3f3f3}"
    ".scroll{overflow-x:auto;margin:1rem 0}img{max-width:100%}figure{margin:1rem 0}"
)


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A standalone page: inline CSS, images by relative path, no script, every text escaped."""
    e = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{e(c)}</th>" for c in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        else:
            body.append(
                f'<figure><img src="{e(quote(block.path))}" alt="{e(block.alt)}">'
                f"<figcaption>{e(block.alt)}</figcaption></figure>"
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n"
    )


class _Report:
    """Reads the study's results into blocks, drawing plots under study_dir/plots as it goes. Each section
    returns [] when its data is absent; `blocks` then says the section was not part of the recipe."""

    def __init__(self, study_dir: Path, results: StudyResults):
        self.dir, self.r = study_dir, results
        self.recipe = StudyRecipe.parse(dict(results.recipe), where="the results' recipe")
        self.plots: dict[str, Path] = {}

    def label(self, model_id: str) -> str:
        model = self.r.models.get(model_id)
        return model.label if model else model_id

    def metric(self, model: ModelResult, task: str) -> float | None:
        return model.primary(task, self.r.primary_metrics[task])

    def task_header(self) -> list[str]:
        return [*(f"{t} ({self.r.primary_metrics[t]})" for t in self.r.tasks), "score"]

    def task_cells(self, model: ModelResult) -> list[str]:
        """The primary metric of every task, then the score (their mean, as the runner computed it)."""
        return [*(fmt(self.metric(model, t)) for t in self.r.tasks), fmt(model.score)]

    def series(self, models: Sequence[ModelResult]) -> dict[str, list[Any]]:
        return {**{t: [self.metric(m, t) for m in models] for t in self.r.tasks}, "score": [m.score for m in models]}

    def plot(self, name: str, alt: str, draw: Callable[[Path], Path]) -> Image:
        self.plots[name] = draw(self.dir / "plots" / f"{name}.png")
        return Image(f"plots/{name}.png", alt)

    def header(self) -> list[Block]:
        recipe, timing = self.recipe, self.r.timing
        ran = (
            f"Recipe {recipe.name}: {fmt(len(self.r.models))} models evaluated on {fmt(len(self.r.tasks))} tasks "
            f"({', '.join(self.r.tasks) or 'none'}). Wall time {fmt(timing and timing.seconds, 1)} s; stages run: "
            f"{fmt(timing and timing.stages_run)}, taken from the cache: {fmt(timing and timing.stages_cached)}."
        )
        if timing is not None:
            ran += f" Its {fmt(timing.stages)} distinct stages took {fmt(timing.stage_seconds, 1)} s when they ran."
        flat = (str, int, float, bool, type(None))  # nested recipe settings stay in results.json
        settings = [
            [k, ", ".join(map(fmt, v)) if isinstance(v, list) else fmt(v)]
            for k, v in self.r.recipe.items()
            if isinstance(v, flat) or (isinstance(v, list) and all(isinstance(x, flat) for x in v))
        ]
        table: list[Block] = [Table(["recipe setting", "value"], settings)] if settings else []
        task_data = ", ".join(f"{task} on {recipe.data_for(task).dataset}" for task in self.r.tasks)
        scale = SCALE_NOTE.format(
            size=recipe.model.size,
            start=", starting from the pretrained ViT-S/14," if recipe.init == "pretrained" else "",
            steps=fmt(recipe.total_steps),
            pairs=" + ".join(recipe.data.names),
            finetune=fmt(recipe.finetune.steps),
            tasks=task_data,
        )
        return [
            Heading(f"Study report: {recipe.name}", 1),
            Heading("What was run"),
            Paragraph(ran),
            *table,
            Paragraph(scale),
        ]

    def claims(self) -> list[Block]:
        claims = self.r.claims
        rows = [[c.paper, ", ".join(map(self.label, c.compare)), c.finding, VERDICTS[c.holds]] for c in claims]
        differ = [f"{c.id} ({c.finding})" for c in claims if c.holds is False]
        undecided = [c.id for c in claims if c.holds is None]
        summary = (
            "This run differs from the paper on: " + "; ".join(differ) + "."
            if differ
            else "No claim this run could decide contradicts the paper."
        )
        if undecided:
            summary += " Inconclusive here (too little data to decide): " + ", ".join(undecided) + "."
        header = ["paper's claim", "models compared", "this run found", "verdict"]
        return [Table(header, rows), Paragraph(summary)] if claims else []

    def baselines(self) -> list[Block]:
        rows = [
            [m.label, m.kind.value, *self.task_cells(m), fmt(m.parameters)] for m in self.r.in_group(Group.BASELINES)
        ]
        return [Table(["model", "kind", *self.task_header(), "parameters"], rows)] if rows else []

    def methods(self) -> list[Block]:
        if not (models := self.r.in_group(Group.METHODS)):
            return []
        rows = [
            [
                m.label,
                m.method or "none",
                ", ".join(f"{k}={v}" for k, v in m.options.items()) or "-",
                fmt((m.zero_shot or {}).get("mean_recall")),
                *self.task_cells(m),
            ]
            for m in models
        ]
        labels, series, title = [m.label for m in models], self.series(models), "Score per method and task"
        return [
            Table(["model", "method", "options", "zero-shot mean recall", *self.task_header()], rows),
            self.plot("methods", title, lambda p: plots.grouped_bars(p, title, labels, series, "primary metric")),
        ]

    def sweep(self, key: str, xlabel: str, plot: bool = True) -> list[Block]:
        sweep: tuple[SweepPoint, ...] = getattr(self.r.sweeps, key)
        if not (points := [p for p in sweep if p.model in self.r.models]):
            return []
        if all(isinstance(p.x, int | float) for p in points):
            points.sort(key=lambda p: p.x)
        models = [self.r.models[p.model] for p in points]
        blocks: list[Block] = [
            Table(
                [xlabel, "model", *self.task_header(), "parameters"],
                [[fmt(p.x), m.label, *self.task_cells(m), fmt(m.parameters)] for p, m in zip(points, models)],
            )
        ]
        if missing := [p.model for p in sweep if p.model not in self.r.models]:
            blocks.append(Paragraph(f"Listed in the sweep but missing from the models: {', '.join(missing)}."))
        if plot:
            title, xs, series = f"Merged score vs {xlabel}", [p.x for p in points], self.series(models)
            blocks.append(self.plot(key, title, lambda path: plots.sweep_lines(path, title, xlabel, xs, series)))
        return blocks

    def mergeability(self) -> list[Block]:
        points, rhos = self.r.mergeability.points, self.r.mergeability.spearman
        names = list(dict.fromkeys([*rhos, *(k for p in points for k in p.metrics)]))
        rows = [
            [
                p.specific,
                self.label(p.merged),
                fmt(p.seed_fraction),
                p.placement,
                *(fmt(p.metrics.get(n)) for n in names),
                fmt(p.score),
            ]
            for p in points
        ]
        title = "Weight distance between experts vs merged score"
        return (
            [
                Table(["metric", "Spearman rho with merged score"], [[n, fmt(rhos.get(n))] for n in names]),
                Table(["specific model", "merged model", "seed fraction", "placement", *names, "score"], rows),
                self.plot("mergeability", title, lambda p: plots.metric_scatter(p, title, names, points, rhos)),
            ]
            if points
            else []
        )

    def gallery(self) -> list[Block]:
        if not (gallery := self.r.gallery):
            return []

        def hit(h: GalleryHit) -> str:
            return f"{h.caption} ({fmt(h.score)}, {'correct' if h.correct else 'wrong'})"

        rows = [[g.image, g.caption, *[*map(hit, g.top[:3]), "-", "-", "-"][:3]] for g in gallery]
        missing = [g.image for g in gallery if not (self.dir / g.image).is_file()]
        note = [Paragraph(f"Query images not found in the study directory: {', '.join(missing)}.")] if missing else []
        return [
            self.plot(
                "gallery",
                "Retrieval gallery: top 3 captions per query image",
                lambda p: plots.retrieval_gallery(p, gallery, self.dir),
            ),
            Table(["query image", "true caption", "top 1", "top 2", "top 3"], rows),
            *note,
        ]

    def full_table(self) -> list[Block]:
        def metrics(model: ModelResult, part: str) -> Mapping[str, float]:
            return (model.zero_shot if part == "zero-shot" else model.tasks.get(part)) or {}

        models = self.r.models.values()
        columns = [
            (part, k)
            for part in ["zero-shot", *self.r.tasks]
            for k in dict.fromkeys(k for m in models for k in metrics(m, part))
        ]
        rows = [[m.label, *(fmt(metrics(m, part).get(k)) for part, k in columns), fmt(m.score)] for m in models]
        return [Table(["model", *(f"{t} {k}" for t, k in columns), "score"], rows)] if rows else []

    def blocks(self) -> list[Block]:
        sections: list[tuple[str, str, Callable[[], list[Block]]]] = [
            ("Paper vs this run", "claims", self.claims),
            ("Baselines at equal total steps", "baseline models", self.baselines),
            ("Merging methods", "merging methods", self.methods),
            ("Seed pre-training length", "seed fraction sweep", lambda: self.sweep("seed_fraction", "seed fraction")),
            ("Interpolation ratio", "interpolation ratio sweep", lambda: self.sweep("interpolation_ratio", "ratio")),
            ("Architecture", "architecture sweep", lambda: self.sweep("architecture", "expert placement", False)),
            ("Mergeability metrics", "mergeability points", self.mergeability),
            ("Retrieval gallery", "retrieval gallery", self.gallery),
            ("Full results", "models", self.full_table),
        ]
        absent = "Not part of this recipe: results.json has no {}."
        return [
            *self.header(),
            *(
                block
                for title, what, build in sections
                for block in [Heading(title), *(build() or [Paragraph(absent.format(what))])]
            ),
        ]


def write_report(study_dir: Path, results: StudyResults) -> dict[str, Path]:
    """Write report.md, report.html and plots/*.png under `study_dir`; return every path written by name."""
    study_dir = Path(study_dir)
    report = _Report(study_dir, results)
    blocks = report.blocks()
    title = next(b.text for b in blocks if isinstance(b, Heading))
    written = {"markdown": study_dir / "report.md", "html": study_dir / "report.html"}
    for key, text in (("markdown", to_markdown(blocks)), ("html", to_html(blocks, title))):
        with atomic_path(written[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return {**written, **report.plots}
