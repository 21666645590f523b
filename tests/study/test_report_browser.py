"""The study report in a real browser: Debian's chromium, headless, opens report.html of hand-made
results (test_report.py's) with no console error, fetches every figure, and leaves a screenshot in
test-artifacts/report.png for a person to look at.

A machine without chromium skips these, unless it is CI (CI set), where .ci/run installs it: there a
missing browser fails, so the check cannot quietly stop running where it matters.
"""

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from test_report import RESULTS, _study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WINDOW = (1280, 2400)
# A quiet, self-contained browser: no network services, no first-run pages, a profile of its own.
FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Which files the browser fetched: FileURLLoader logs each file:// request at verbosity 1.
LOADER_LOG = "FileURLLoader::Start: "


@pytest.fixture(scope="module")
def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI runs these")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    study_dir = tmp_path_factory.mktemp("study")
    paths, _, _ = _study(study_dir, RESULTS)
    return paths["html"]


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _image_sources(html: str) -> list[str]:
    parser = _Images()
    parser.feed(html)
    return parser.sources


def test_report_opens_without_errors_and_loads_every_image(browser, report, tmp_path):
    page = report.as_uri()
    result = _chromium(
        browser,
        tmp_path / "profile",
        "--enable-logging=stderr",
        "--v=0",
        "--vmodule=file_url_loader_factory=1",
        "--dump-dom",
        page,
    )
    log = result.stderr.splitlines()
    page_errors = [line for line in log if "CONSOLE" in line or "Failed to load resource" in line or "Uncaught" in line]
    assert page_errors == []

    dom = result.stdout
    assert "<h1>" in dom and f"Study report: {RESULTS.name}" in dom
    assert all(model.label in dom for model in RESULTS.models.values())
    sources = _image_sources(dom)
    assert sources and sources == _image_sources(report.read_text(encoding="utf-8"))

    requested = {line.split(LOADER_LOG, 1)[1].strip() for line in log if LOADER_LOG in line}
    assert page in requested, "chromium no longer logs file loads this way: update LOADER_LOG and --vmodule"
    for source in sources:
        image = report.parent / unquote(source)
        assert image.is_file() and image.read_bytes()[:8] == PNG_SIGNATURE, source
        assert image.resolve().as_uri() in requested, f"the browser never fetched {source}"


def test_report_screenshot_is_saved_for_a_person_to_look_at(browser, report, tmp_path):
    screenshot = ARTIFACTS / "report.png"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot.unlink(missing_ok=True)
    _chromium(
        browser,
        tmp_path / "profile",
        f"--screenshot={screenshot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
        report.as_uri(),
    )
    assert screenshot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    # not a blank page: text, tables and figures leave well over 1 % of the page not white
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.01
