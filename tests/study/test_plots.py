"""The report's figures drawn on hand-made numbers: a PNG each, gaps for missing values, and what the
figure says (titles, intervals, colours) read back from it."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.study import plots
from vlmerge.study.plots import CostPoint, ForestRow, cost_scatter, forest_plot, sweep_bands

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.filterwarnings("error")  # a NaN must not make matplotlib complain either

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save; a closed figure still holds what was drawn on it."""
    kept = []
    save = plots._save

    def keep(fig, path):
        kept.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def _rows(n: int, verdict: str = "reproduced") -> list[ForestRow]:
    return [
        ForestRow(f"task {i}, fine-tune", f"claim {i % 3}", 0.01 * i, 0.01 * i - 0.02, 0.01 * i + 0.02, verdict)
        for i in range(n)
    ]


def _pixels(path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return set(map(tuple, np.unique(rgb, axis=0).tolist()))


def _height(path) -> int:
    with Image.open(path) as image:
        return image.height


def _rgb(name: str) -> tuple[int, int, int]:
    from matplotlib.colors import to_rgb

    return tuple(round(255 * c) for c in to_rgb(name))


FOREST_WITH_GAPS = [
    ForestRow("retrieval, fine-tune", "seed", 0.05, 0.01, 0.09, "reproduced", reference=0.07),
    ForestRow("vqa, fine-tune", "seed", None, None, None, "inconclusive", reference=0.04),
    ("vqa, linear probe", "parity", math.nan, None, 0.2, "inconclusive"),
    ("retrieval, linear probe", "parity", -0.03, -0.08, 0.02, "contradicted", None),
]


def test_forest_plot_writes_a_png_with_one_line_per_row_under_its_group(tmp_path, figures):
    path = forest_plot(tmp_path / "plots" / "forest.png", "Claims", FOREST_WITH_GAPS, "difference")
    assert path == tmp_path / "plots" / "forest.png" and _is_png(path)
    (ax,) = figures[0].axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [
        "seed",
        "retrieval, fine-tune",
        "vqa, fine-tune",
        "parity",
        "vqa, linear probe",
        "retrieval, linear probe",
    ]
    bold = [t.get_text() for t in ax.get_yticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["seed", "parity"]
    numbers = [t.get_text() for t in ax.texts]
    assert numbers == ["+0.050 [+0.010, +0.090]", "n/a", "n/a", "-0.030 [-0.080, +0.020]"]


def test_forest_plot_colours_rows_by_verdict(tmp_path, figures):
    verdicts = ["reproduced", "contradicted", "inconclusive", "reproduced"]
    rows = [dataclasses.replace(row, group="one claim", verdict=v) for row, v in zip(_rows(4), verdicts)]
    forest_plot(tmp_path / "forest.png", "t", rows, "x")
    (ax,) = figures[0].axes
    estimates = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [line.get_xdata()[0] for line in estimates] == [row.estimate for row in rows]
    assert [line.get_color() for line in estimates] == ["tab:green", "tab:red", "tab:gray", "tab:green"]
    assert _rgb("tab:green") in _pixels(tmp_path / "forest.png")


def test_forest_plot_grows_with_its_rows_and_keeps_them_apart(tmp_path):
    heights = {n: _height(forest_plot(tmp_path / f"{n}.png", "t", _rows(n), "x")) for n in (1, 10, 40)}
    assert heights[1] < heights[10] < heights[40]
    # 30 more rows (the same 3 group headers): at least a quarter inch each
    assert (heights[40] - heights[10]) / 30 >= 0.25 * plots.DPI


def test_forest_plot_rejects_an_unknown_verdict_and_no_rows(tmp_path):
    with pytest.raises(ConfigError, match="unknown verdicts \\['holds'\\]"):
        forest_plot(tmp_path / "f.png", "t", [("a", "g", 0.1, 0.0, 0.2, "holds")], "x")
    with pytest.raises(ConfigError, match="at least one row"):
        forest_plot(tmp_path / "f.png", "t", [], "x")
    assert not (tmp_path / "f.png").exists()


def test_sweep_bands_shade_each_interval_and_leave_gaps_for_missing_values(tmp_path, figures):
    series = {
        "retrieval": [(0.10, 0.08, 0.12), (0.12, 0.10, 0.15), None, (0.15, 0.12, 0.18)],
        "vqa": [(0.30, 0.28, 0.33), (0.33, math.nan, 0.36), (None, None, None), (0.36, 0.34, 0.39)],
    }
    path = sweep_bands(tmp_path / "bands.png", "Score vs seed", "seed fraction", [0.0, 0.25, 0.5, 1.0], series)
    assert _is_png(path)
    (ax,) = figures[0].axes
    means = {
        line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if not line.get_label().startswith("_")
    }
    assert means["retrieval"][:2] == [0.10, 0.12] and math.isnan(means["retrieval"][2])
    assert math.isnan(means["vqa"][2])
    band = ax.collections[0].get_paths()[0].vertices  # retrieval's band over the first two points
    assert band[:, 1].min() == pytest.approx(0.08) and band[:, 1].max() == pytest.approx(0.15)
    assert band[:, 0].max() == pytest.approx(0.25)  # the band stops at the gap
    isolated = [line for line in ax.get_lines() if line.get_label().startswith("_")]
    assert [list(line.get_ydata()) for line in isolated] == [[0.12, 0.18], [0.28, 0.33], [0.34, 0.39]]


def test_sweep_bands_take_named_points_on_the_x_axis(tmp_path):
    series = {"score": [(0.2, 0.1, 0.3), (0.25, 0.2, 0.3)]}
    assert _is_png(sweep_bands(tmp_path / "arch.png", "Score per placement", "placement", ["all", "top"], series))


def test_cost_scatter_titles_carry_rho_and_its_interval(tmp_path, figures):
    points = [
        CostPoint("seed 0.5", {"l2": 3.1, "cosine": 0.05, "ssd": 0.3}, -0.01),
        CostPoint("seed 0.0", {"l2": 9.0, "cosine": 0.41, "ssd": None}, -0.09),
        CostPoint("not evaluated", {"l2": 4.0, "cosine": math.nan}, None),
    ]
    rhos = {"l2": (-0.83, -0.97, -0.2), "cosine": (0.5, None, None), "ssd": None}
    path = cost_scatter(tmp_path / "cost.png", "Distance vs retention", ["l2", "cosine", "ssd", "tv"], points, rhos)
    assert _is_png(path)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes[:4]] == [
        "l2: rho -0.83 [-0.97, -0.20]",
        "cosine: rho +0.50 (no interval)",
        "ssd: rho n/a",
        "tv: rho n/a",
    ]
    assert axes[0].get_ylabel() == "merge retention"
    assert [len(ax.collections[0].get_offsets()) for ax in axes[:4]] == [2, 2, 1, 0]
    assert [t.get_text() for t in axes[3].texts] == ["no measured points"]
    assert not axes[4].axison and not axes[5].axison  # the unused cells of the 2 x 3 grid
