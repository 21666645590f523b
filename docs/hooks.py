"""Reference pages generated at build time from the registries, so they cannot drift from the code.

mkdocs runs `on_files` (mkdocs.yml: `hooks:`); nothing generated is committed. Each page comes from
one function returning Markdown, which tests call directly (tests/test_docs.py):

- reference/cli.md: `vlmerge.cli.parser.build_parser()`, every subcommand and its arguments;
- reference/methods.md: `vlmerge.merging.MERGE_METHODS`, every method and its options;
- reference/layouts.md: `vlmerge.io.layout.LAYOUTS`, every checkpoint layout's rename table;
- reference/datasets.md: `vlmerge.data.sources.SOURCES`, every dataset, its uses, splits and paths.
"""

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any

GENERATED_NOTE = "*Generated from the code when the site is built (`docs/hooks.py`); edit the code, not this page.*"


def _cell(text: Any) -> str:
    """Text for one Markdown table cell: one line, pipes escaped outside code spans (inside one, the
    table extension does not split on them, and an escape would show)."""
    parts = " ".join(str(text).split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _code(text: Any) -> str:
    text = str(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _docstring(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


# ----------------------------------------------------------------------------- command line
def _argument_row(action: argparse.Action) -> tuple[str, ...]:
    name = ", ".join(action.option_strings) if action.option_strings else action.dest
    if action.choices is not None and not isinstance(action.choices, dict):
        value = "{" + ",".join(str(choice) for choice in action.choices) + "}"
    elif action.nargs == 0:
        value = ""
    else:
        value = action.metavar or (action.dest.upper() if action.option_strings else "")
    if action.required or not action.option_strings:
        default = "required" if action.nargs not in ("?", "*") else ""
    elif action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        default = ""
    else:
        default = _code(action.default)
    help_text = (action.help or "") % {"default": action.default, "prog": ""} if action.help else ""
    return (_code(name), _code(value) if value else "", default, help_text)


def cli_reference() -> str:
    """Every subcommand of `vlmerge`, its description and arguments, from the parser `main()` builds."""
    from vlmerge.cli.parser import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = [
        "# Command line",
        "",
        GENERATED_NOTE,
        "",
        f"`vlmerge COMMAND ...` ({_cell(parser.description)}); also `python -m vlmerge` and "
        "`torchrun -m vlmerge`. Every error is one line on stderr with exit status 2.",
        "",
        *_table(
            ("command", "what it does"), [(f"[`{name}`](#{name})", helps.get(name) or "") for name in commands.choices]
        ),
    ]
    for name, sub in commands.choices.items():
        lines += ["", f"## {name}", "", _cell(sub.description or helps.get(name) or ""), ""]
        rows = [_argument_row(action) for action in sub._actions if not isinstance(action, argparse._HelpAction)]
        lines += _table(("argument", "value", "default", "help"), rows)
        if name == "merge":
            lines += ["", "Each option of each merge method is a flag too: see [Merge methods](methods.md)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- merge methods
def _type_label(annotation: Any) -> str:
    from vlmerge.cli.options import type_name

    return type_name(annotation)


def methods_reference() -> str:
    """Every registered merge method: summary, what it needs, each option, and its `--help` listing."""
    from vlmerge.cli.options import describe_method
    from vlmerge.merging import MERGE_METHODS

    methods = [MERGE_METHODS.get(name) for name in MERGE_METHODS]

    def needs(method) -> str:
        found = ["seed checkpoint (`--seed-checkpoint`)"] if method.needs_origin else []
        found += [f"{method.statistics.value} (`{method.statistics.flag}`)"] if method.statistics is not None else []
        return ", ".join(found) or "—"

    lines = [
        "# Merge methods",
        "",
        GENERATED_NOTE,
        "",
        "Every method registered in `vlmerge.merging.MERGE_METHODS` (a method registered in Python with "
        "`@register_method` before the CLI runs is listed by `vlmerge merge --help` the same way). Each option is "
        "a flag of `vlmerge merge` (`--NAME VALUE`) and can be given as `--option NAME=VALUE`; how the methods "
        "relate and how options take per-module values is in the [merging guide](../merging.md).",
        "",
        *_table(
            ("method", "summary", "needs", "options"),
            [(f"[`{m.name}`](#{m.name})", m.summary, needs(m), ", ".join(m.options.model_fields)) for m in methods],
        ),
    ]
    for method in methods:
        lines += ["", f"## {method.name}", "", _cell(method.summary), ""]
        lines += [f"Needs: {needs(method)}. Defined in `{method.fn.__module__}`.", ""]
        fields = method.options.model_fields
        if fields:
            rows = []
            for name, field in fields.items():
                default = "required" if field.is_required() else _code(field.get_default(call_default_factory=True))
                each = "yes" if name in method.per_expert else ""
                rows.append(
                    (
                        _code("--" + name.replace("_", "-")),
                        _type_label(field.annotation),
                        default,
                        each,
                        field.description or "",
                    )
                )
            lines += _table(("option", "type", "default", "per expert", "description"), rows)
        else:
            lines.append("No options.")
        lines += ["", "As `vlmerge merge --help` lists it:", "", "```text", describe_method(method), "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- checkpoint layouts
def layouts_reference() -> str:
    """Every key layout in `vlmerge.io.layout.LAYOUTS`: how its files are recognised and its rename table."""
    from vlmerge.io import layout as layout_module

    lines = [
        "# Checkpoint layouts",
        "",
        GENERATED_NOTE,
        "",
        _docstring(layout_module).split("\n\n")[0],
        "",
        "The first rule whose pattern matches renames a key; a key no rule matches keeps its name. "
        "`vlmerge inspect` prints the layout a file was read in and why; `vlmerge merge --input-layout` "
        "forces one, `--layout` names the output's. What each family was checked against is in "
        "[Checkpoints and families](../checkpoints.md).",
        "",
        *_table(
            ("layout", "summary"), [(_code(spec.layout.value), spec.summary) for spec in layout_module.LAYOUTS.values()]
        ),
    ]
    for spec in layout_module.LAYOUTS.values():
        lines += ["", f"## {spec.layout.value}", "", _cell(spec.summary), ""]
        experts = ", ".join(f"{m.value} → {_code(name)}" for m, name in spec.experts.items())
        prefixes = ", ".join(_code(p) for p in spec.prefixes if p)
        lines += [f"- experts: {experts}", f"- recognised by a key matching {_code(spec.signature)}"]
        lines += [f"- optional wrapper prefix: {prefixes}"] if prefixes else []
        lines.append("")
        if spec.rules:
            rows = [
                (_code(rule.native), _code(rule.foreign), "native is (1, *foreign shape)" if rule.add_batch_dim else "")
                for rule in spec.rules
            ]
            lines += _table(("native", spec.layout.value, "shape"), rows)
        else:
            lines.append("No renaming: these are vlmerge's own names.")
        if spec.unused:
            lines += ["", "Stored but never read by the family's forward (passed through in this layout only):", ""]
            lines += _table(
                ("key pattern", "unused when present"),
                [(_code(pattern), _code(when) if when else "always") for pattern, when in spec.unused],
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- datasets
def datasets_reference() -> str:
    """Every registered dataset: where it comes from, the uses and splits it provides, the paths it reads."""
    import vlmerge.data.datasets  # noqa: F401  (registers every dataset)
    from vlmerge.data.sources import SOURCES

    sources = {name: SOURCES.get(name) for name in sorted(SOURCES)}

    def paths(source) -> str:
        needed = [_code(key) for key in source.path_keys]
        optional = [_code(key) + " (optional)" for key in source.optional_path_keys]
        return ", ".join(needed + optional) or "—"

    lines = [
        "# Datasets",
        "",
        GENERATED_NOTE,
        "",
        "Every dataset registered in `vlmerge.data.sources.SOURCES`, by the `dataset:` name a config uses; "
        "`paths:` names the local files it reads. How data is read and pooled is in the [data guide](../data.md).",
        "",
        *_table(
            ("dataset", "uses", "splits", "paths"),
            [
                (f"[`{name}`](#{name})", ", ".join(s.provides()), ", ".join(s.splits), paths(s))
                for name, s in sources.items()
            ],
        ),
    ]
    for name, source in sources.items():
        module = sys.modules[source.__module__]
        lines += ["", f"## {name}", ""]
        lines += [_docstring(module).split("\n\n")[0], ""] if module.__doc__ else []
        lines += [_docstring(source), ""] if source.__doc__ else []
        lines += [
            f"- uses: {', '.join(_code(use) for use in source.provides())}",
            f"- splits: {', '.join(source.splits)}",
            f"- paths: {paths(source)}",
            f"- defined in `{source.__module__}`",
        ]
    return "\n".join(lines) + "\n"


REFERENCES: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_reference,
    "reference/methods.md": methods_reference,
    "reference/layouts.md": layouts_reference,
    "reference/datasets.md": datasets_reference,
}


def on_files(files, config):
    """Add the generated reference pages to the site (mkdocs hook)."""
    from mkdocs.structure.files import File

    for path, generate in REFERENCES.items():
        files.append(File.generated(config, path, content=generate()))
    return files
