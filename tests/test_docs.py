"""The documentation site builds with warnings as errors, and its reference pages follow the registries."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.merging import MERGE_METHODS, MergeInputs, register_method, unregister_method

ROOT = Path(__file__).resolve().parents[1]


def load_hooks():
    spec = importlib.util.spec_from_file_location("vlmerge_docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_the_site_builds_strictly(tmp_path):
    """`make docs` in a temporary folder: a broken link, a page outside the navigation or a bad docstring fails."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    for page in (
        "index",
        "reference/cli/index",
        "reference/methods/index",
        "reference/layouts/index",
        "reference/datasets/index",
    ):
        assert (site / f"{page}.html").is_file(), page
    methods = (site / "reference" / "methods" / "index.html").read_text(encoding="utf-8")
    assert all(f'id="{name}"' in methods for name in MERGE_METHODS)


class ToyOptions(StrictConfig):
    tilt: float = Field(0.125, description="how far the toy leans towards the first expert")


def toy_tilt(inputs: MergeInputs, options: ToyOptions):
    """Toy tilt: the first expert, leaning by tilt towards it."""
    first, *rest = inputs.experts.values()
    return first + options.tilt * sum(rest)


def test_a_registered_method_appears_in_the_generated_references():
    """Registered the way a user would, a method gets its section, options and flag; removed, it is gone."""
    hooks = load_hooks()
    register_method("toy_tilt", ToyOptions, needs_origin=True)(toy_tilt)
    try:
        methods, cli = hooks.methods_reference(), hooks.cli_reference()
    finally:
        unregister_method("toy_tilt")
    assert "## toy_tilt" in methods and "[`toy_tilt`](#toy_tilt)" in methods
    section = methods.split("## toy_tilt")[1]
    assert "Toy tilt: the first expert, leaning by tilt towards it." in section
    assert "| `--tilt` | FLOAT | `0.125` |  | how far the toy leans towards the first expert |" in section
    assert "Needs: seed checkpoint (`--seed-checkpoint`)." in section
    assert "`--tilt`" in cli  # the merge command's flag, derived from the options class
    assert "toy_tilt" not in hooks.methods_reference()


def test_every_method_has_its_formula_in_the_merging_guide():
    """The formulas are written by hand (docs/merging.md); a new built-in method needs its row."""
    guide = (ROOT / "docs" / "merging.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", guide, flags=re.MULTILINE))
    assert sorted(set(MERGE_METHODS) - rows) == []


def test_generated_references_cover_every_registry_entry():
    hooks = load_hooks()
    from vlmerge.data.sources import SOURCES
    from vlmerge.io.layout import LAYOUTS

    layouts, datasets = hooks.layouts_reference(), hooks.datasets_reference()
    assert all(f"## {layout.value}\n" in layouts for layout in LAYOUTS)
    assert all(f"## {name}\n" in datasets for name in SOURCES)
    cli = hooks.cli_reference()
    for command in ("merge", "tune", "inspect", "study", "export-hf"):
        assert f"## {command}\n" in cli
