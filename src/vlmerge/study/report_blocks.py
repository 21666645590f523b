"""The report's blocks (heading, paragraph, table, image), its one number format, and their rendering to
markdown and to a standalone HTML page: the report is built once as blocks, so the two cannot drift apart."""

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from vlmerge.study.stats import Estimate


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
