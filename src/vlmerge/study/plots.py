"""The study's figures, drawn from the numbers and typed results the report hands over.

matplotlib is an optional dependency (`vlmerge[report]`), imported only when a figure is drawn,
always with the Agg backend so a report renders on a machine without a display.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmerge.core.errors import ConfigError
from vlmerge.study.results import GalleryEntry

DPI = 110
Number = float | int | None
Interval = tuple[Number, Number, Number]  # (estimate, low, high), the 95 % interval around the estimate
VERDICT_COLORS = {
    "reproduced": "tab:green",
    "contradicted": "tab:red",
    "equivalent": "tab:blue",
    "inconclusive": "tab:gray",
}


@dataclass(frozen=True)
class ForestRow:
    """One comparison of a forest plot: an effect with its 95 % interval, under the claim it tests."""

    label: str  # e.g. "retrieval, linear probe"
    group: str  # e.g. the claim; rows of one group are drawn together under its name
    estimate: Number
    low: Number
    high: Number
    verdict: str  # a key of VERDICT_COLORS
    reference: Number = None  # the paper's figure, when it gives one


@dataclass(frozen=True)
class CostPoint:
    """A merge in a mergeability panel: the experts' distances before it, what merging kept after."""

    label: str
    metrics: Mapping[str, Number]  # metric -> distance between the experts
    retention: Number  # merged score minus the specific model's score


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError("plots need matplotlib: pip install 'vlmerge[report]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(values: Sequence[Number]) -> list[float]:
    """None (not measured) becomes NaN, which matplotlib leaves out instead of drawing 0."""
    return [math.nan if v is None else float(v) for v in values]


def _finite(value: Number) -> bool:
    return value is not None and math.isfinite(value)


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    _pyplot().close(fig)
    return path


def method_panels(
    path: Path,
    title: str,
    methods: Sequence[str],
    series: Mapping[str, Sequence[Interval | None]],
    xlabel: str = "metric",
) -> Path:
    """One panel per series (a task, or the mean), one row per method: its estimate with its 95 % interval,
    the methods named once on the left. The figure grows with the methods, so twenty stay readable where
    grouped bars would crowd; a dotted line marks the first method's estimate (the main merge) in each
    panel to read the others against, and a value not measured leaves its row empty."""
    plt = _pyplot()
    panels = max(1, len(series))
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(min(24.0, max(7.6, 3.5 + 2.4 * panels)), 1.4 + 0.3 * len(methods)),
        sharey=True,
        squeeze=False,
    )
    ys = list(range(len(methods), 0, -1))
    for ax, (name, values) in zip(axes[0], series.items()):
        for y in ys[1::2]:  # every other row shaded, to follow a method across the panels
            ax.axhspan(y - 0.5, y + 0.5, color="0.94", linewidth=0, zorder=0)
        for y, value in zip(ys, values):
            estimate, low, high = _values(value if value is not None else (None, None, None))
            if math.isfinite(low) and math.isfinite(high):
                ax.plot([low, high], [y, y], color="tab:blue", linewidth=2.0, solid_capstyle="butt", zorder=2)
            if math.isfinite(estimate):
                ax.plot([estimate], [y], "o", color="tab:blue", markersize=5, zorder=3)
        if values and values[0] is not None and _finite(values[0][0]):
            ax.axvline(float(values[0][0]), color="black", linestyle=":", linewidth=0.9, zorder=1)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    first = axes[0][0]
    first.set_yticks(ys, methods, fontsize=8)
    first.set_ylim(0.4, len(methods) + 0.6)
    fig.suptitle(title)
    return _save(fig, path)


def sweep_bands(
    path: Path,
    title: str,
    xlabel: str,
    xs: Sequence[float | str],
    series: Mapping[str, Sequence[Interval | None]],
    ylabel: str = "metric",
) -> Path:
    """One line per series over the swept value, its 95 % interval shaded around it; a missing value
    (None, or NaN in any part) leaves a gap rather than a point at 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for name, values in series.items():
        mean, low, high = (_values([None if v is None else v[i] for v in values]) for i in range(3))
        (line,) = ax.plot(xs, mean, marker="o", label=name, linewidth=1.6, zorder=3)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0, zorder=2)
        banded = [math.isfinite(lo) and math.isfinite(hi) for lo, hi in zip(low, high)]
        for i, x in enumerate(xs):  # a band needs two neighbours: an interval on its own is a bar
            if banded[i] and not any(banded[j] for j in (i - 1, i + 1) if 0 <= j < len(xs)):
                ax.plot([x, x], [low[i], high[i]], color=line.get_color(), alpha=0.35, linewidth=6, zorder=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _rho_text(rho: Interval | None) -> str:
    if rho is None or not _finite(rho[0]):
        return "rho n/a"
    estimate, low, high = rho
    interval = f" [{low:+.2f}, {high:+.2f}]" if _finite(low) and _finite(high) else " (no interval)"
    return f"rho {estimate:+.2f}{interval}"


def cost_scatter(
    path: Path,
    title: str,
    metrics: Sequence[str],
    points: Sequence[CostPoint],
    rhos: Mapping[str, Interval | None],
) -> Path:
    """One panel per metric: each merge's distance between experts against its merge retention (merged
    minus specific score; below the line at 0, merging lost), with Spearman rho and its 95 % interval."""
    plt = _pyplot()
    columns = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    ys = _values([p.retention for p in points])
    for ax, metric in zip(axes.flat, metrics):
        xs = _values([p.metrics.get(metric) for p in points])
        shown = [(x, y, p.label) for x, y, p in zip(xs, ys, points) if math.isfinite(x) and math.isfinite(y)]
        if shown:
            ax.axhline(0.0, color="black", linewidth=0.8, zorder=1)
        ax.scatter([x for x, _, _ in shown], [y for _, y, _ in shown], color="tab:blue", zorder=3)
        for x, y, label in shown:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points", annotation_clip=True)
        if not shown:
            ax.set(xticks=[], yticks=[])
            ax.text(0.5, 0.5, "no measured points", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        ax.margins(x=0.2, y=0.15)  # room for the labels inside the panel
        ax.set(title=f"{metric}: {_rho_text(rhos.get(metric))}", xlabel=metric, ylabel="merge retention")
        ax.title.set_fontsize("medium")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def retrieval_gallery(path: Path, entries: Sequence[GalleryEntry], root: Path, top: int = 3) -> Path:
    """Each query image (a path under `root`) beside its top captions, correct ones marked; a missing
    image is said so."""
    plt = _pyplot()
    from matplotlib.image import imread

    fig, axes = plt.subplots(
        len(entries), 2, figsize=(7.5, 1.7 * len(entries)), squeeze=False, gridspec_kw={"width_ratios": [1, 3]}
    )
    for (image_ax, text_ax), entry in zip(axes, entries):
        image_ax.axis("off")
        text_ax.axis("off")
        image = root / entry.image
        if image.is_file():
            image_ax.imshow(imread(image), interpolation="nearest")
        else:
            image_ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=8)
        text_ax.text(0, 0.92, f"true: {entry.caption}", fontsize=9, weight="bold", va="top")
        for rank, hit in enumerate(entry.top[:top], start=1):
            mark = "correct" if hit.correct else "wrong"
            text_ax.text(
                0,
                0.92 - 0.24 * rank,
                f"{rank}. {hit.caption} ({hit.score:.3f}, {mark})",
                fontsize=9,
                va="top",
                color="tab:green" if hit.correct else "tab:red",
            )
    fig.suptitle("Retrieval gallery: top captions per query image")
    return _save(fig, path)


def _interval_text(row: ForestRow) -> str:
    if not _finite(row.estimate):
        return "n/a"
    interval = f" [{row.low:+.3f}, {row.high:+.3f}]" if _finite(row.low) and _finite(row.high) else ""
    return f"{row.estimate:+.3f}{interval}"


def forest_plot(path: Path, title: str, rows: Sequence[ForestRow | tuple], xlabel: str) -> Path:
    """One line per comparison (claim x task x protocol), grouped under its claim: the estimate with
    its 95 % interval, coloured by verdict, the paper's figure as a hollow diamond, a line at 0. The
    figure grows with the rows so forty stay readable; a row not measured says so."""
    rows = [row if isinstance(row, ForestRow) else ForestRow(*row) for row in rows]
    if not rows:
        raise ConfigError("a forest plot needs at least one row")
    unknown = sorted({row.verdict for row in rows} - set(VERDICT_COLORS))
    if unknown:
        raise ConfigError(f"unknown verdicts {unknown}; a forest row's verdict is one of {list(VERDICT_COLORS)}")
    groups = list(dict.fromkeys(row.group for row in rows))
    lines = [line for group in groups for line in [(group, None), *((group, r) for r in rows if r.group == group)]]
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation, blended_transform_factory

    fig, ax = plt.subplots(figsize=(9.0, 1.6 + 0.28 * len(lines)))
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for y, (_, row) in zip(range(len(lines), 0, -1), lines):
        if row is None:
            ax.axhline(y, color="black", linewidth=0.4, alpha=0.3, zorder=1)
            continue
        color = VERDICT_COLORS[row.verdict]
        if _finite(row.low) and _finite(row.high):
            ax.plot([row.low, row.high], [y, y], color=color, linewidth=2.0, solid_capstyle="butt", zorder=2)
        if _finite(row.estimate):
            ax.plot([row.estimate], [y], "o", color=color, markersize=7, zorder=3)
        if _finite(row.reference):
            ax.plot([row.reference], [y], "D", markerfacecolor="none", color="black", markersize=6, zorder=4)
        ax.text(1.02, y, _interval_text(row), transform=right, va="center", fontsize=8, family="monospace")
    ax.axvline(0.0, color="black", linewidth=0.9, zorder=1)
    ax.set_yticks(range(len(lines), 0, -1), [group if row is None else row.label for group, row in lines], fontsize=8)
    for tick, (_, row) in zip(ax.get_yticklabels(), lines):
        tick.set_fontweight("bold" if row is None else "normal")
    ax.set_ylim(0.4, len(lines) + 0.6)
    ax.set(title=title, xlabel=xlabel)
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], marker="o", color=c, linewidth=2.0, label=v) for v, c in VERDICT_COLORS.items()]
    handles.append(Line2D([], [], marker="D", markerfacecolor="none", color="black", linestyle="", label="paper"))
    below = ax.transAxes + ScaledTranslation(0.0, -0.55, fig.dpi_scale_trans)  # under the x label
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=below,
        ncol=4,
        fontsize="small",
        frameon=False,
    )
    return _save(fig, path)
