"""The study report: results.json as markdown and a standalone HTML page, with PNG plots.

Every number shown is read from the study's results (results.json); nothing is recomputed here.
The report is built once as a list of blocks (heading, paragraph, table, image) and rendered to
both formats, so they cannot drift apart. A section whose data is absent says so instead of failing.
"""

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vlmerge.io.atomic import atomic_path
from vlmerge.study import plots
from vlmerge.study.claims import PAPER_SEED_GAIN_VALUES, TARGET_RHO, protocol_name
from vlmerge.study.recipe import MergeSpec, option_text
from vlmerge.study.results import MEAN, GalleryHit, Group, ModelResult, StudyResults, SweepPoint, Verdict
from vlmerge.study.stats import Correlation, Estimate

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


def interval(estimate: Estimate | None) -> str:
    """A mean with its 95 % interval, as every table shows it."""
    return "n/a" if estimate is None else f"{fmt(estimate.mean)} [{fmt(estimate.low)}, {fmt(estimate.high)}]"


Column = tuple[str, Callable[[ModelResult], str]]  # a table column: its header, and its cell of a model
LABEL: Column = ("model", lambda m: m.label)


class _Report:
    """Reads the study's results into blocks, drawing plots under study_dir/plots as it goes. Each section
    returns [] when its data is absent; `blocks` then says the section was not part of the recipe."""

    def __init__(self, study_dir: Path, results: StudyResults):
        self.dir, self.r = study_dir, results
        self.recipe = results.recipe
        self.plots: dict[str, Path] = {}

    def label(self, model_id: str) -> str:
        model = self.r.models.get(model_id)
        return model.label if model else model_id

    def tasks(self, protocol: str) -> list[str]:
        """The tasks a protocol scored (in the recipe's order), then their mean."""
        return list(dict.fromkeys(t for m in self.r.models.values() for t in m.scores.get(protocol, {})))

    def task_header(self, protocol: str) -> list[str]:
        return [f"{t} ({self.r.primary_metrics[t]})" if t != MEAN else "mean" for t in self.tasks(protocol)]

    def task_cells(self, model: ModelResult, protocol: str) -> list[str]:
        return [interval(score.estimate if (score := model.score(protocol, t)) else None) for t in self.tasks(protocol)]

    def plot(self, name: str, alt: str, draw: Callable[[Path], Path]) -> Image:
        self.plots[name] = draw(self.dir / "plots" / f"{name}.png")
        return Image(f"plots/{name}.png", alt)

    def header(self) -> list[Block]:
        recipe, timing = self.recipe, self.r.timing
        ran = (
            f"Recipe {recipe.name}: {fmt(len(self.r.models))} models evaluated on {fmt(len(self.r.tasks))} tasks "
            f"({', '.join(self.r.tasks) or 'none'}) under {', '.join(map(protocol_name, self.r.protocols))}, "
            f"random seeds {', '.join(map(str, recipe.random_seeds))} (sweeps: "
            f"{', '.join(map(str, recipe.sweep_random_seeds))}). Wall time {fmt(timing and timing.seconds, 1)} s; "
            f"stages run: {fmt(timing and timing.stages_run)}, taken from the cache: "
            f"{fmt(timing and timing.stages_cached)}."
        )
        if timing is not None:
            ran += f" Its {fmt(timing.stages)} distinct stages took {fmt(timing.stage_seconds, 1)} s when they ran."
        flat = (str, int, float, bool, type(None))  # nested recipe settings stay in results.json
        settings = [
            [k, ", ".join(map(fmt, v)) if isinstance(v, list) else fmt(v)]
            for k, v in recipe.model_dump(mode="json").items()
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
        how = (
            "Every score is the mean over random seeds with its 95 % interval in brackets: the wider of a "
            "t-interval over seeds and a bootstrap over test examples. Every comparison is a paired difference "
            "(same seed, same test examples); it reproduces the paper when its interval excludes zero in the "
            "paper's direction, contradicts it when it excludes zero the other way, and is inconclusive otherwise."
        )
        return [
            Heading(f"Study report: {recipe.name}", 1),
            Heading("What was run"),
            Paragraph(ran),
            *table,
            Paragraph(scale),
            Paragraph(how),
        ]

    def claims(self) -> list[Block]:
        if not (claims := self.r.claims):
            return []
        blocks: list[Block] = [
            Table(["claim", "paper's claim", "verdict"], [[c.id, c.paper, c.verdict.value] for c in claims])
        ]
        blocks += [Paragraph(f"{c.id}: {c.verdict.value}. {c.summary}") for c in claims]
        rows = [
            plots.ForestRow(
                f"{c.task}, {protocol_name(c.protocol)}",
                claim.id,
                c.difference.mean,
                c.difference.low,
                c.difference.high,
                c.verdict.value,
                PAPER_SEED_GAIN_VALUES.get(c.task) if claim.id == "seed" else None,
            )
            for claim in claims
            for c in claim.comparisons
        ]
        if rows:
            title = "Paired differences with 95 % intervals (paper's figure: hollow diamond)"
            blocks.append(self.plot("forest", title, lambda p: plots.forest_plot(p, title, rows, "difference")))
            compared = dict.fromkeys(m for claim in claims for c in claim.comparisons for m in (c.a, c.b))
            blocks.append(Paragraph("Models compared: " + "; ".join(f"{m} = {self.label(m)}" for m in compared) + "."))
            blocks.append(
                Table(
                    [
                        "claim",
                        "compared",
                        "protocol",
                        "task",
                        "difference [95 % interval]",
                        "seeds",
                        "interval from",
                        "paper",
                        "verdict",
                        "note",
                    ],
                    [
                        [
                            claim.id,
                            f"{c.a} minus {c.b}",
                            protocol_name(c.protocol),
                            c.task,
                            interval(c.difference),
                            fmt(c.difference.seeds),
                            c.difference.source,
                            c.paper or "-",
                            c.verdict.value,
                            "protocol blind here (see the control)" if c.note else "-",
                        ]
                        for claim in claims
                        for c in claim.comparisons
                    ],
                )
            )
        trends = [(claim.id, t) for claim in claims for t in claim.trends]
        if trends:
            blocks.append(
                Table(
                    ["claim", "trend", "protocol", "Spearman rho [95 % interval]", "points", "verdict"],
                    [
                        [
                            cid,
                            t.name,
                            protocol_name(t.protocol),
                            self.rho(t.correlation),
                            fmt(t.correlation.points),
                            t.verdict.value,
                        ]
                        for cid, t in trends
                    ],
                )
            )
        return blocks

    @staticmethod
    def rho(c: Correlation) -> str:
        return "n/a" if c.rho is None else f"{fmt(c.rho)} [{fmt(c.low)}, {fmt(c.high)}]"

    def control(self) -> list[Block]:
        if not (rows := self.r.control):
            return []
        gain = [
            [protocol_name(c.protocol), c.task, interval(c.difference), fmt(c.difference.seeds), c.verdict.value]
            for c in rows
        ]
        blind = [f"{c.task} {protocol_name(c.protocol)}" for c in rows if c.verdict is not Verdict.REPRODUCED]
        text = (
            "Pre-training gain: the modality-agnostic model from scratch minus the same model with no "
            "pre-training, each fine-tuned and evaluated alike. Where this gain is not distinguishable from zero, "
            "the protocol cannot separate pre-training conditions on that task, and no claim about pre-training "
            "can be decided there: " + (", ".join(blind) if blind else "none") + "."
        )
        return [Paragraph(text), Table(["protocol", "task", "gain [95 % interval]", "seeds", "verdict"], gain)]

    def model_table(self, models: Sequence[ModelResult], columns: Sequence[Column]) -> list[Block]:
        """Per protocol, one row per model: `columns` first, then each task's score, then the seed count."""
        blocks: list[Block] = []
        for protocol in self.r.protocols:
            rows = [
                [*(cell(m) for _, cell in columns), *self.task_cells(m, protocol), fmt(len(m.seeds))]
                for m in models
                if m.scores.get(protocol)
            ]
            if rows:
                blocks.append(Paragraph(f"Scores {protocol_name(protocol)}:"))
                blocks.append(Table([*(name for name, _ in columns), *self.task_header(protocol), "seeds"], rows))
        return blocks

    def baselines(self) -> list[Block]:
        models = [*self.r.in_group(Group.BASELINES), *self.r.in_group(Group.CONTROL)]
        if not models:
            return []
        return self.model_table(
            models, [LABEL, ("kind", lambda m: m.kind.value), ("parameters", lambda m: fmt(m.parameters))]
        )

    def methods(self) -> list[Block]:
        if not (models := self.r.in_group(Group.METHODS)):
            return []
        options = ("options", lambda m: ", ".join(f"{k}={option_text(v)}" for k, v in m.options.items()) or "-")
        blocks = self.model_table(models, [LABEL, ("method", lambda m: m.method or "none"), options])
        protocol = self.r.protocols[0]
        # In the figure a method is named by what tells it apart (method and options, `ties (density=0.2)`):
        # the seed share and expert placement the models' labels repeat are the same for every one.
        names = [MergeSpec(method=m.method, options=dict(m.options)).label if m.method else m.label for m in models]
        series = {
            t: [
                (s.estimate.mean, s.estimate.low, s.estimate.high) if (s := m.score(protocol, t)) else None
                for m in models
            ]
            for t in self.tasks(protocol)
        }
        title = f"Score per method and task ({protocol_name(protocol)}, 95 % intervals)"
        blocks.append(
            self.plot("methods", title, lambda p: plots.method_panels(p, title, names, series, "primary metric"))
        )
        blocks.append(Paragraph(f"In each panel of the figure the dotted line marks the score of {names[0]}."))
        return blocks

    def sweep(self, key: str, xlabel: str, plot: bool = True) -> list[Block]:
        sweep: tuple[SweepPoint, ...] = getattr(self.r.sweeps, key)
        if not (points := [p for p in sweep if p.model in self.r.models]):
            return []
        if all(isinstance(p.x, int | float) for p in points):
            points.sort(key=lambda p: p.x)
        models = [self.r.models[p.model] for p in points]
        xs = {m.id: p.x for p, m in zip(points, models)}
        blocks = self.model_table(models, [(xlabel, lambda m: fmt(xs[m.id])), LABEL])
        if missing := [p.model for p in sweep if p.model not in self.r.models]:
            blocks.append(Paragraph(f"Listed in the sweep but missing from the models: {', '.join(missing)}."))
        if plot:
            protocol = self.r.protocols[0]
            series = {
                t: [
                    (s.estimate.mean, s.estimate.low, s.estimate.high) if (s := m.score(protocol, t)) else None
                    for m in models
                ]
                for t in self.tasks(protocol)
            }
            title = f"Merged score vs {xlabel} ({protocol_name(protocol)}, 95 % bands)"
            blocks.append(
                self.plot(
                    key, title, lambda path: plots.sweep_bands(path, title, xlabel, [p.x for p in points], series)
                )
            )
        return blocks

    def mergeability(self) -> list[Block]:
        section = self.r.mergeability
        if not section.points:
            return []
        blocks: list[Block] = [
            Paragraph(
                "What a mergeability metric should predict is what merging costs. Each point is a modality-specific "
                "model under one seed: the distance between its experts, and what its merge kept of its score "
                "(merged minus unmerged, mean over tasks; negative is a loss). A useful metric ranks the merges: "
                f"target rho <= {TARGET_RHO} with the interval below zero."
            )
        ]
        for protocol, by_metric in section.correlations.items():
            blocks.append(
                Table(
                    [
                        f"metric ({protocol_name(protocol)})",
                        "Spearman rho with retention [95 % interval]",
                        "points",
                        "meets the target",
                    ],
                    [
                        [
                            metric.label,
                            self.rho(c),
                            fmt(c.points),
                            fmt(c.rho is not None and c.rho <= TARGET_RHO and c.high is not None and c.high < 0),
                        ]
                        for metric, c in by_metric.items()
                    ],
                )
            )
        model_level = [metric for metric in section.points[0].metrics if metric.layers is None]
        labels = [metric.label for metric in model_level]
        retention_protocols = list(section.correlations)
        rows = [
            [
                self.label(p.specific),
                self.label(p.merged),
                fmt(p.random_seed),
                fmt(p.seed_fraction),
                p.placement,
                *(fmt(p.metrics.get(n)) for n in model_level),
                *(fmt(p.retention.get(r)) for r in retention_protocols),
            ]
            for p in section.points
        ]
        blocks.append(
            Table(
                [
                    "specific model",
                    "merged model",
                    "seed",
                    "seed fraction",
                    "placement",
                    *labels,
                    *(f"retention {protocol_name(r)}" for r in retention_protocols),
                ],
                rows,
            )
        )
        for protocol in retention_protocols:  # one figure per protocol: they can disagree (see the claims)
            cost = [
                plots.CostPoint(
                    f"{p.placement} {p.seed_fraction:g}/{p.random_seed}",
                    {metric.label: value for metric, value in p.metrics.items()},
                    p.retention.get(protocol),
                )
                for p in section.points
            ]
            rhos = {
                n.label: (c.rho, c.low, c.high) if c.rho is not None else None
                for n, c in section.correlations[protocol].items()
            }
            title = f"Distance between experts vs what merging kept ({protocol_name(protocol)})"
            blocks.append(
                self.plot(
                    f"mergeability-{protocol}",
                    title,
                    lambda p, title=title, cost=cost, rhos=rhos: plots.cost_scatter(p, title, labels, cost, rhos),
                )
            )
        return blocks

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
        models = list(self.r.models.values())
        blocks: list[Block] = []
        for protocol in self.r.protocols:
            columns = [(t, k) for t in self.tasks(protocol) if t != MEAN for k in self.metric_names(protocol, t)]
            rows = [
                [m.label, *(fmt(s.metrics.get(k)) if (s := m.score(protocol, t)) else "n/a" for t, k in columns)]
                for m in models
                if m.scores.get(protocol)
            ]
            if rows:
                blocks.append(Paragraph(f"Every metric {protocol_name(protocol)}, mean over seeds:"))
                blocks.append(Table(["model", *(f"{t} {k}" for t, k in columns)], rows))
        return blocks

    def metric_names(self, protocol: str, task: str) -> list[str]:
        scores = [m.score(protocol, task) for m in self.r.models.values()]
        return list(dict.fromkeys(k for score in scores if score is not None for k in score.metrics))

    def blocks(self) -> list[Block]:
        sections: list[tuple[str, str, Callable[[], list[Block]]]] = [
            ("Paper vs this run", "claims", self.claims),
            ("Pre-training gain (no-pre-training control)", "control", self.control),
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
