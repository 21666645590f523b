"""Command-line text into merge inputs: every flag of a merge is derived from a pydantic class's fields
(the merge request's, and each registered method's options), so that a new field is a new flag.

`vlmerge merge`, `vlmerge tune` and `vlmerge inspect` take the method options; `merge` and `tune`
take the merge request (`add_request_arguments`, `request_from_args`).
"""

import argparse
import json
from collections.abc import Mapping
from enum import Enum
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.merging.registry import MERGE_METHODS, MergeMethod, method_options, takes_spec, unwrap_optional
from vlmerge.merging.request import MergeRequest

REQUEST_ALIASES = {"selection": ("--experts",)}  # another name a request flag also answers to


def option_flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def type_name(annotation: Any) -> str:
    """FLOAT, INT, TEXT, BOOL, {a,b} for a choice, JSON for lists, dicts and models: an option's metavar."""
    kind = unwrap_optional(annotation)
    if get_origin(kind) is Literal:
        return "{" + ",".join(str(choice) for choice in get_args(kind)) + "}"
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "{" + ",".join(str(member.value) for member in kind) + "}"
    scalars = {float: "FLOAT", int: "INT", str: "TEXT", bool: "BOOL"}
    return scalars.get(kind, "JSON" if _structured(kind) else "VALUE")


def describe_method(method: MergeMethod) -> str:
    """The method, what it needs, and each option with its default and description (`vlmerge merge --help`)."""
    needs = ["--seed-checkpoint"] if method.needs_origin else []
    needs += [method.statistics.flag] if method.statistics is not None else []
    lines = [f"  {method.name:<15} {method.summary}" + (f" [needs {', '.join(needs)}]" if needs else "")]
    for name, field in method.options.model_fields.items():
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)}"
        each = " [per expert]" if name in method.per_expert else ""
        lines.append(f"      {option_flag(name):<18} {field.description or ''} ({default}){each}")
    return "\n".join(lines)


def describe_methods() -> str:
    """Every registered method with its options, defaults and descriptions."""
    return "\n".join(describe_method(MERGE_METHODS.get(name)) for name in MERGE_METHODS)


# ----------------------------------------------------------------------------- the merge request
REQUEST: type[StrictConfig] = MergeRequest  # the class whose fields are the flags (a test swaps in a subclass)


def request_fields() -> dict[str, FieldInfo]:
    """The fields that become the flags of `merge` and `tune`."""
    return dict(REQUEST.model_fields)


def add_request_arguments(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    """The merge request's required fields as positional arguments (`positional=True`), or every other
    field as a flag: its type gives argparse's type, choices or a switch, its description the help."""
    for name, field in request_fields().items():
        if field.is_required() != positional:
            continue
        kind = unwrap_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        settings: dict[str, Any] = {"help": field.description}
        if kind is bool:
            settings["action"] = "store_true"
        elif isinstance(kind, type) and issubclass(kind, Enum):
            settings.update(choices=[member.value for member in kind], default=getattr(default, "value", default))
        elif kind is int:
            settings["type"] = int
        if positional:
            parser.add_argument(name, **settings)
        else:
            parser.add_argument(option_flag(name), *REQUEST_ALIASES.get(name, ()), dest=name, **settings)


def request_from_args(args: argparse.Namespace, command: str) -> MergeRequest:
    """The merge request of a parsed `merge` or `tune` command line."""
    return REQUEST.parse({name: getattr(args, name) for name in request_fields()}, where=command)


# ----------------------------------------------------------------------------- method options
class CollectOption(argparse.Action):
    """`--NAME VALUE` (the option's name in `const`) and `--option NAME=VALUE` both add to
    `args.options`, as text: the chosen method's options class parses it."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        name, text = (self.const, value) if self.const else value
        namespace.options = {**(namespace.options or {}), name: text}


def option_pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """--option for any option, and a flag per option of the registered methods (a name several share, once)."""
    command = parser.prog  # "vlmerge merge", "vlmerge inspect", ...
    parser.add_argument(
        "--option",
        dest="options",
        action=CollectOption,
        type=option_pair,
        metavar="NAME=VALUE",
        help="any option of the method (repeatable)",
    )
    for option in method_options().values():
        used_by = ", ".join(option.methods).replace("%", "%%")  # argparse formats help with %
        flag = option_flag(option.name)
        try:
            parser.add_argument(
                flag,
                dest="options",
                action=CollectOption,
                const=option.name,
                metavar=type_name(option.annotation),
                help=f"option of {used_by}",
            )
        except argparse.ArgumentError:
            raise ConfigError(
                f"merge option {option.name!r} of {', '.join(option.methods)} clashes with "
                f"`{command} {flag}`; rename the option"
            ) from None


def options_from_text(method_name: str, texts: Mapping[str, str]) -> dict[str, Any]:
    """Option values given as text (the command line), ready for the method's options class:
    JSON for list, dict and model options, and for an int or float option given a coefficient spec
    (a JSON list or object: merging/coefficients.py); the text itself otherwise (the options class
    parses numbers, booleans and choices). `random-seed` and `random_seed` name the same option."""
    fields = MERGE_METHODS.get(method_name).options.model_fields
    values = {}
    for key, text in texts.items():
        name = key.replace("-", "_")
        annotation = fields[name].annotation if name in fields else None
        if name in fields and _structured(unwrap_optional(annotation)):
            values[name] = _json_or_text(name, text)
        elif name in fields and takes_spec(annotation) and text.lstrip()[:1] in ("[", "{"):
            values[name] = _spec_json(name, text)
        else:
            values[name] = text
    return values


def _spec_json(name: str, text: str) -> Any:
    try:
        return _bounded_json(name, text)
    except ValueError as error:  # JSONDecodeError, or an integer of more digits than Python converts
        raise ConfigError(f"option {name}: {_shortened(text)} is not a JSON list or object ({error})") from None


def _json_or_text(name: str, text: str) -> Any:
    try:
        return _bounded_json(name, text)
    except ValueError:
        return text  # the options class names the problem


def _bounded_json(name: str, text: str) -> Any:
    """`json.loads`, with nesting too deep for its recursion one `ConfigError` instead of a traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"option {name}: {_shortened(text)} is nested too deep to be a coefficient spec") from None


def _shortened(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def _structured(annotation: Any) -> bool:
    """Lists, dicts, tuples, sets and models: options written as JSON on the command line."""
    return (get_origin(annotation) or annotation) in (list, dict, tuple, set, frozenset) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )
