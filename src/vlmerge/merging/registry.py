"""The merge-method registry: what a method receives (`MergeInputs`), how it is registered, and the
options of every registered method as the command line sees them (one flag per option name).

A method is a small pure function `fn(inputs, options) -> tensor` with a pydantic options class;
its options class is all the command line needs (`vlmerge merge --NAME VALUE` or `--option NAME=VALUE`).
"""

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.core.registry import Registry


class MergeWarning(UserWarning):
    """A merge went ahead with a documented fallback (missing or singular Gram matrix)."""


@dataclass(frozen=True)
class MergeInputs:
    target: str
    experts: Mapping[Modality, torch.Tensor]
    origin: torch.Tensor | None = None  # seed checkpoint tensor, for task-vector methods
    grams: Mapping[Modality, torch.Tensor | None] | None = None  # per expert, for linear weights only
    prepared: BaseModel | None = None  # what the method's pre-pass found over the whole model, if it has one

    def modality_vectors(self) -> dict[Modality, torch.Tensor]:
        """theta_m - theta_0: what each modality's training added to the seed."""
        return {m: w - self.origin for m, w in self.experts.items()}


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[[MergeInputs, StrictConfig], torch.Tensor]
    options: type[StrictConfig]
    needs_origin: bool = False
    needs_grams: bool = False
    summary: str = ""
    # Optional pre-pass over the inputs of every merged tensor. What it returns (a frozen pydantic
    # model, or None when there is nothing to record) reaches the method as `MergeInputs.prepared`
    # and is recorded in the merged file; the user's options stay as given.
    prepare: Callable[[Iterable[MergeInputs], StrictConfig], BaseModel | None] | None = None

    def describe(self) -> str:
        """The method, what it needs, and each option with its default and description (`vlmerge merge --help`)."""
        needs = [
            flag for flag, needed in (("--seed-checkpoint", self.needs_origin), ("--grams", self.needs_grams)) if needed
        ]
        lines = [f"  {self.name:<15} {self.summary}" + (f" [needs {', '.join(needs)}]" if needs else "")]
        for name, field in self.options.model_fields.items():
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)}"
            lines.append(f"      {option_flag(name):<18} {field.description or ''} ({default})")
        return "\n".join(lines)


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register_method(
    name: str,
    options: type[StrictConfig],
    *,
    needs_origin: bool = False,
    needs_grams: bool = False,
    prepare: Callable[[Iterable[MergeInputs], StrictConfig], BaseModel | None] | None = None,
):
    def decorator(fn):
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        MERGE_METHODS.add(name, MergeMethod(name, fn, options, needs_origin, needs_grams, summary, prepare))
        return fn

    return decorator


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register their own clean up with this)."""
    MERGE_METHODS.remove(name)


@dataclass(frozen=True)
class MethodOption:
    """One option name and its type, shared by every registered method that has it: one CLI flag."""

    name: str
    annotation: Any
    methods: tuple[str, ...]

    @property
    def flag(self) -> str:
        return option_flag(self.name)

    @property
    def type_name(self) -> str:
        """FLOAT, INT, TEXT, BOOL, {a,b} for a choice, JSON for lists, dicts and models."""
        kind = _unwrap_optional(self.annotation)
        if get_origin(kind) is Literal:
            return "{" + ",".join(str(choice) for choice in get_args(kind)) + "}"
        if isinstance(kind, type) and issubclass(kind, Enum):
            return "{" + ",".join(str(member.value) for member in kind) + "}"
        scalars = {float: "FLOAT", int: "INT", str: "TEXT", bool: "BOOL"}
        return scalars.get(kind, "JSON" if _structured(kind) else "VALUE")


def option_flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def method_options() -> dict[str, MethodOption]:
    """Every option of every registered method, by name; a name two methods give different types fails."""
    found: dict[str, MethodOption] = {}
    for method in MERGE_METHODS:
        for name, field in MERGE_METHODS.get(method).options.model_fields.items():
            known = found.get(name)
            if known is not None and known.annotation != field.annotation:
                raise ConfigError(
                    f"merge option {name!r} is {_type_label(known.annotation)} for "
                    f"{', '.join(known.methods)} but {_type_label(field.annotation)} for {method}; "
                    "one name must have one type across methods to be one command-line flag"
                )
            found[name] = MethodOption(name, field.annotation, (*known.methods, method) if known else (method,))
    return found


def describe_methods() -> str:
    """Every registered method with its options, defaults and descriptions."""
    return "\n".join(MERGE_METHODS.get(name).describe() for name in MERGE_METHODS)


def options_from_text(method_name: str, texts: Mapping[str, str]) -> dict[str, Any]:
    """Option values given as text (the command line), ready for the method's options class:
    JSON for list, dict and model options, the text itself otherwise (the options class parses
    numbers, booleans and choices). `random-seed` and `random_seed` name the same option."""
    fields = MERGE_METHODS.get(method_name).options.model_fields
    values = {}
    for key, text in texts.items():
        name = key.replace("-", "_")
        structured = name in fields and _structured(_unwrap_optional(fields[name].annotation))
        values[name] = _json_or_text(text) if structured else text
    return values


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # the options class names the problem


def _unwrap_optional(annotation: Any) -> Any:
    """X for `X | None`, else the annotation itself."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation


def _structured(annotation: Any) -> bool:
    """Lists, dicts, tuples, sets and models: options written as JSON on the command line."""
    return (get_origin(annotation) or annotation) in (list, dict, tuple, set, frozenset) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )


def _type_label(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
