"""The report's sections, one method each: a section reads its part of results.json into blocks, drawing
its plots under study_dir/plots as it goes, and returns [] when its data is absent."""

from collections.abc import Callable, Sequence
from pathlib import Path

from vlmerge.study import plots
from vlmerge.study.claims import PAPER_SEED_GAIN_VALUES, TARGET_RHO, capitalised, protocol_name, reason
from vlmerge.study.recipe import option_text
from vlmerge.study.report_blocks import Block, Image, Paragraph, Table, fmt, interval
from vlmerge.study.results import (
    MEAN,
    Claim,
    Comparison,
    GalleryHit,
    Group,
    Mergeability,
    ModelResult,
    StudyResults,
    SweepPoint,
    Verdict,
)
from vlmerge.study.stats import Correlation

Column = tuple[str, Callable[[ModelResult], str]]  # a table column: its header, and its cell of a model
LABEL: Column = ("model", lambda m: m.label)


class Sections:
    """Reads the study's results into blocks, one method per section, drawing plots as it goes."""

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

    def claims(self) -> list[Block]:
        if not (claims := self.r.claims):
            return []
        blocks: list[Block] = [
            Table(["claim", "paper's claim", "verdict"], [[c.id, c.paper, c.verdict.value] for c in claims])
        ]
        blocks += [Paragraph(f"{c.id}: {c.verdict.value}. {c.summary}") for c in claims]
        return blocks + self.comparisons(claims) + self.trends(claims)

    def compared(self, c: Comparison) -> str:
        return c.label or f"{c.a} minus {c.b}"

    def comparisons(self, claims: Sequence[Claim]) -> list[Block]:
        """Every paired difference of the claims: as a forest plot, then as a table with its tests."""
        rows = [
            plots.ForestRow(
                f"{c.task}, {protocol_name(c.protocol)}",
                claim.id,
                c.difference.mean,
                c.difference.low,
                c.difference.high,
                c.verdict.value,
                PAPER_SEED_GAIN_VALUES.get(c.task) if claim.id == "seed" and c.protocol != "heldout" else None,
            )
            for claim in claims
            for c in claim.comparisons
            if c.headline
        ]
        if not rows:
            return []
        title = "Headline paired differences with 95 % intervals (paper's figure: hollow diamond)"
        compared = dict.fromkeys(m for claim in claims for c in claim.comparisons for m in (c.a, c.b))
        header = [
            "claim",
            "compared",
            "protocol",
            "task",
            "difference [95 % interval]",
            "seeds",
            "p (sign-flip)",
            "Holm-adjusted p",
            "equivalence p (margin)",
            "detectable at 80 %",
            "paper",
            "verdict",
        ]
        table = [
            [
                claim.id + ("" if c.headline else " (per task)"),
                self.compared(c),
                protocol_name(c.protocol),
                c.task,
                interval(c.difference),
                fmt(c.difference.seeds),
                fmt(c.test.p) if c.test else "-",
                f"{fmt(c.test.adjusted_p)} (of {c.test.family})" if c.test else "-",
                f"{fmt(c.test.tost_p)} (±{fmt(c.test.margin)})" if c.test and c.test.tost_p is not None else "-",
                fmt(c.test.detectable) if c.test else "-",
                c.paper or "-",
                c.verdict.value,
            ]
            for claim in claims
            for c in claim.comparisons
        ]
        return [
            self.plot("forest", title, lambda p: plots.forest_plot(p, title, rows, "difference")),
            Paragraph(
                "Models compared: " + "; ".join(f"{m} = {self.label(m)}" for m in compared) + ". A difference is "
                "oriented so that positive favours the claim (a loss enters with its sign turned). The headline rows "
                "decide the claim; the per-task rows are a second Holm family, reported but not deciding."
            ),
            Table(header, table),
        ]

    def trends(self, claims: Sequence[Claim]) -> list[Block]:
        if not (trends := [(claim.id, t) for claim in claims for t in claim.trends]):
            return []
        rows = [
            [
                cid,
                t.name,
                protocol_name(t.protocol),
                self.rho(t.correlation),
                fmt(t.correlation.points),
                fmt(t.adjusted_p) if t.adjusted_p is not None else "-",
                t.verdict.value,
            ]
            for cid, t in trends
        ]
        header = ["claim", "trend", "protocol", "Spearman rho [95 % interval]", "points", "Holm-adjusted p", "verdict"]
        return [Table(header, rows)]

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
        headline = [c for c in rows if c.headline]
        blind = [protocol_name(c.protocol) for c in headline if c.verdict is not Verdict.REPRODUCED]
        text = (
            "Pre-training gain: the modality-agnostic model from scratch minus the same model with no "
            "pre-training, evaluated alike (held-out loss: its fall), decided like the claims. A task that "
            "cannot show this gain cannot show that two pre-training conditions are the same: there, a claim's "
            "'no difference' (equivalence) or 'no worse' (parity) reads inconclusive. A difference a protocol "
            "does detect stands whatever the control shows. Protocols not shown to see pre-training: "
            + (", ".join(blind) if blind else "none")
            + ". "
            + " ".join(f"{capitalised(protocol_name(c.protocol))}: {reason(c)}." for c in headline)
        )
        return [Paragraph(text), Table(["protocol", "task", "gain [95 % interval]", "seeds", "verdict"], gain)]

    def path(self) -> list[Block]:
        """The held-out loss along the interpolation path between the experts, per model, with bands."""
        if not (points := self.r.path):
            return []
        ratios = sorted({p.ratio for p in points})
        models = list(dict.fromkeys(p.model for p in points))
        by = {(p.model, p.ratio): p.loss for p in points}
        series = {
            self.label(m): [(e.mean, e.low, e.high) if (e := by.get((m, r))) else None for r in ratios] for m in models
        }
        title = "Held-out loss along the path between the experts (95 % bands)"
        rows = [[self.label(m), *(interval(by.get((m, r))) for r in ratios)] for m in models]
        return [
            Paragraph(
                "Each point merges the experts of the model's own modality-specific parent by interpolation at that "
                "ratio (the vision expert's weight; a vision-language expert keeps its third) and scores the "
                "pre-training objectives on held-out pairs. A path that bulges above the line between its ends has "
                "a loss barrier: the experts are not linearly connected (the barrier claim reads its middle)."
            ),
            self.plot(
                "path",
                title,
                lambda p: plots.sweep_bands(p, title, "vision expert's weight", ratios, series, "held-out loss (nats)"),
            ),
            Table(["model", *(f"ratio {fmt(r)}" for r in ratios)], rows),
        ]

    def dose(self) -> list[Block]:
        """What merging loses against the length of the modality-specific stage, per origin."""
        if not (curves := self.r.dose):
            return []
        steps = list(curves[0].steps)
        names = {"naive": "experts from random weights (naive merging)", "seed": "experts from the seed run"}
        series = {names.get(d.condition, d.condition): [(c.mean, c.low, c.high) for c in d.costs] for d in curves}
        title = "What merging loses on held-out pairs vs modality-specific steps (95 % bands)"
        rows = [
            [names.get(d.condition, d.condition), *(interval(c) for c in d.costs), self.rho(d.correlation)]
            for d in curves
        ]
        sentences = " ".join(
            f"{names.get(d.condition, d.condition).capitalize()}: Spearman rho {self.rho(d.correlation)} over "
            f"{d.correlation.points} (length, seed) points."
            for d in curves
        )
        return [
            Paragraph(
                "Does what merging loses grow with how far the experts travel? Each point trains the modality-specific "
                "stage for that many steps (from random weights, or from the main setting's seed run), merges it by "
                "the main merge, and scores the merged minus the unmerged held-out loss (nats; positive is a loss). "
                + sentences
            ),
            self.plot(
                "dose",
                title,
                lambda p: plots.sweep_bands(
                    p, title, "modality-specific steps", steps, series, "held-out loss lost by merging (nats)"
                ),
            ),
            Table(["experts", *(f"{s} steps" for s in steps), "Spearman rho [95 % interval]"], rows),
        ]

    def score_series(self, models: Sequence[ModelResult], protocol: str) -> dict[str, list]:
        """Per task, each model's (mean, low, high) under `protocol`, None where it has no score: what the
        method and sweep figures draw."""
        return {
            t: [
                (s.estimate.mean, s.estimate.low, s.estimate.high) if (s := m.score(protocol, t)) else None
                for m in models
            ]
            for t in self.tasks(protocol)
        }

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
        # In the figure a method is named by what tells it apart (method, options and learnt coefficients,
        # `ties (density=0.2)`): the seed share and expert placement the models' labels repeat are the same.
        names = [m.merge_label or m.label for m in models]
        series = self.score_series(models, protocol)
        title = f"Score per method and task ({protocol_name(protocol)}, 95 % intervals)"
        blocks.append(
            self.plot("methods", title, lambda p: plots.method_panels(p, title, names, series, "primary metric"))
        )
        blocks.append(Paragraph(f"In each panel of the figure the dotted line marks the score of {names[0]}."))
        return blocks + self.method_differences(dict(zip((m.id for m in models), names)))

    def method_differences(self, names: dict[str, str]) -> list[Block]:
        """Each method minus the main merge, paired, with its tests; ranked per protocol in a figure."""
        if not (found := self.r.methods):
            return []
        reading = {"reproduced": "better", "contradicted": "worse"}
        order = sorted(found, key=lambda c: (self.r.protocols.index(c.protocol), -c.difference.mean))
        rows = [
            plots.ForestRow(
                names.get(c.a, c.a),
                protocol_name(c.protocol),
                c.difference.mean,
                c.difference.low,
                c.difference.high,
                c.verdict.value,
            )
            for c in order
        ]
        title = "Each method minus the main merge, ranked (95 % intervals; green better, red worse)"
        table = [
            [
                names.get(c.a, c.a),
                protocol_name(c.protocol),
                c.task,
                interval(c.difference),
                fmt(c.difference.seeds),
                fmt(c.test.p) if c.test else "-",
                fmt(c.test.adjusted_p) if c.test else "-",
                reading.get(c.verdict.value, c.verdict.value),
            ]
            for c in order
        ]
        header = [
            "method",
            "protocol",
            "task",
            "minus the main merge [95 % interval]",
            "seeds",
            "p (sign-flip)",
            "Holm-adjusted p",
            "reading",
        ]
        return [
            Paragraph(
                f"Each method minus {names.get('seed-merge', 'the main merge')}, paired by seed and test example, "
                f"one Holm family over the {len(found)} differences."
            ),
            self.plot("method-ranks", title, lambda p: plots.forest_plot(p, title, rows, "difference")),
            Table(header, table),
        ]

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
            series = self.score_series(models, protocol)
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
            rows = [
                [
                    metric.label,
                    self.rho(c),
                    fmt(c.points),
                    fmt(c.rho is not None and c.rho <= TARGET_RHO and c.high is not None and c.high < 0),
                ]
                for metric, c in by_metric.items()
            ]
            header = [
                f"metric ({protocol_name(protocol)})",
                "Spearman rho with retention [95 % interval]",
                "points",
                "meets the target",
            ]
            blocks.append(Table(header, rows))
        return blocks + self.mergeability_points(section)

    def mergeability_points(self, section: Mergeability) -> list[Block]:
        """Every point's model-level distances and retention as a table, then one figure per protocol."""
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
        header = [
            "specific model",
            "merged model",
            "seed",
            "seed fraction",
            "placement",
            *labels,
            *(f"retention {protocol_name(r)}" for r in retention_protocols),
        ]
        # One figure per protocol: they can disagree (see the claims).
        return [Table(header, rows), *(self.cost_plot(section, protocol, labels) for protocol in retention_protocols)]

    def cost_plot(self, section: Mergeability, protocol: str, labels: Sequence[str]) -> Image:
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
        return self.plot(f"mergeability-{protocol}", title, lambda p: plots.cost_scatter(p, title, labels, cost, rhos))

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
