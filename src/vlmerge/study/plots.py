"""The study's figures, drawn from the numbers and typed results the report hands over.

matplotlib is an optional dependency (`vlmerge[report]`), imported only when a figure is drawn,
always with the Agg backend so a report renders on a machine without a display.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmerge.core.errors import ConfigError
from vlmerge.study.results import GalleryEntry, MergeabilityPoint

DPI = 110
Number = float | int | None


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


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    _pyplot().close(fig)
    return path


def grouped_bars(
    path: Path, title: str, groups: Sequence[str], series: dict[str, Sequence[Number]], ylabel: str = "metric"
) -> Path:
    """One group of bars per entry of `groups` (a model), one bar per series (a task, or the score)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.6, 0.3 * len(groups) * len(series) + 3)), 4.4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, _values(values), width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set(title=title, ylabel=ylabel)
    _legend_outside(ax)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sweep_lines(
    path: Path, title: str, xlabel: str, xs: Sequence[float], series: dict[str, Sequence[Number]], main: str = "score"
) -> Path:
    """One line per series over the swept value; the `main` series is drawn bold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for name, values in series.items():
        bold = name == main
        ax.plot(
            xs,
            _values(values),
            marker="o",
            label=name,
            linewidth=2.6 if bold else 1.2,
            linestyle="-" if bold else "--",
            color="black" if bold else None,
            zorder=3 if bold else 2,
        )
    ax.set(title=title, xlabel=xlabel, ylabel="metric")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def metric_scatter(
    path: Path, title: str, metrics: Sequence[str], points: Sequence[MergeabilityPoint], rhos: Mapping[str, Number]
) -> Path:
    """One small panel per metric: each point is a specific model, its distance against its merged score."""
    plt = _pyplot()
    columns = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        xs = _values([p.metrics.get(metric) for p in points])
        ys = _values([p.score for p in points])
        ax.scatter(xs, ys, color="tab:blue", zorder=3)
        for x, y, point in zip(xs, ys, points):
            if not (math.isnan(x) or math.isnan(y)):
                ax.annotate(point.specific, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rho = rhos.get(metric)
        ax.set(title=f"{metric} (rho {'n/a' if rho is None else f'{rho:+.2f}'})", xlabel=metric, ylabel="merged score")
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
