"""The merge-method registry: what a method receives (`MergeInputs`), how it is registered, and the
options of every registered method by name (one type per name, so that one name is one flag).

A method is a small pure function `fn(inputs, options) -> tensor` with a pydantic options class;
its options class is all the command line needs (`vlmerge.cli.options` turns it into flags).
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Protocol, Union, get_args, get_origin

import torch
from pydantic import BaseModel

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.core.registry import Registry


class MergeWarning(UserWarning):
    """A merge went ahead with a documented fallback (missing or singular Gram matrix)."""


class Statistics(str, Enum):
    """Statistics of data a method merges with: each has its own collection pass and file."""

    GRAMS = "grams"  # X^T X of each expert linear layer's inputs (`vlmerge grams`)
    FISHER = "fisher"  # the diagonal Fisher of each expert tensor (`vlmerge fisher`)

    @property
    def flag(self) -> str:
        return f"--{self.value}"


class StatisticsFile(Protocol):
    """What a method's `check_statistics` sees of the file: where it is and how it was collected."""

    @property
    def path(self) -> Path: ...

    @property
    def provenance(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class MergeInputs:
    target: str
    experts: Mapping[Modality, torch.Tensor]
    origin: torch.Tensor | None = None  # seed checkpoint tensor, for task-vector methods
    grams: Mapping[Modality, torch.Tensor | None] | None = None  # per expert, for linear weights only
    fisher: Mapping[Modality, torch.Tensor | None] | None = None  # per expert diagonal Fisher, for every tensor
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
    statistics: Statistics | None = None  # the statistics of data it merges with, if any
    summary: str = ""
    # Optional pre-pass over the inputs of every merged tensor. What it returns (a frozen pydantic
    # model, or None when there is nothing to record) reaches the method as `MergeInputs.prepared`
    # and is recorded in the merged file; the user's options stay as given.
    prepare: Callable[[Iterable[MergeInputs], StrictConfig], BaseModel | None] | None = None
    # Optional check, before any tensor is read, that the statistics file was collected the way this
    # merge needs (RegMean++: sequentially, with the merge's own options); raises MergeError if not.
    # It receives the file, the parsed options and the merge's expert selection.
    check_statistics: Callable[[StatisticsFile, StrictConfig, str], None] | None = None
    # Options the method applies expert by expert: given a dict by expert (merging/coefficients.py),
    # each reaches the method as a mapping modality -> value.
    per_expert: frozenset[str] = frozenset()
    # Options the pre-pass reads, which must then take one value over the whole model (None: all).
    model_wide: tuple[str, ...] | None = None
    # The most experts one merged tensor may have for this method (None: any number); checked over
    # the whole plan before any tensor is read.
    max_experts: int | None = None
    # Merges its groups side by side on the caller's cores, each on one thread (merging/side_by_side.py):
    # for methods whose time is their own arithmetic (SVDs, solves), whose groups hold little memory.
    compute_bound: bool = False

    @property
    def needs_grams(self) -> bool:
        return self.statistics is Statistics.GRAMS


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register_method(
    name: str,
    options: type[StrictConfig],
    *,
    needs_origin: bool = False,
    needs_grams: bool = False,
    statistics: Statistics | None = None,
    prepare: Callable[[Iterable[MergeInputs], StrictConfig], BaseModel | None] | None = None,
    check_statistics: Callable[[StatisticsFile, StrictConfig, str], None] | None = None,
    per_expert: Iterable[str] = (),
    model_wide: Iterable[str] | None = None,
    max_experts: int | None = None,
    compute_bound: bool = False,
):
    """`needs_grams=True` is short for `statistics=Statistics.GRAMS`. `per_expert`: the int or float
    options the method applies expert by expert; `model_wide`: the options its pre-pass reads;
    `max_experts`: the most experts one merged tensor may have for it; `compute_bound`: its groups merge
    side by side on the caller's cores."""
    if needs_grams:
        statistics = Statistics.GRAMS
    fields = options.model_fields
    for option in per_expert:
        if option not in fields or not takes_spec(fields[option].annotation):
            raise ConfigError(f"method {name!r}: per-expert option {option!r} is no int or float option of its class")

    def decorator(fn):
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        method = MergeMethod(
            name,
            fn,
            options,
            needs_origin=needs_origin,
            statistics=statistics,
            summary=summary,
            prepare=prepare,
            check_statistics=check_statistics,
            per_expert=frozenset(per_expert),
            model_wide=tuple(model_wide) if model_wide is not None else None,
            max_experts=max_experts,
            compute_bound=compute_bound,
        )
        MERGE_METHODS.add(name, method)
        return fn

    return decorator


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register their own clean up with this)."""
    MERGE_METHODS.remove(name)


@dataclass(frozen=True)
class MethodOption:
    """One option name and its type, shared by every registered method that has it: one CLI flag
    (`vlmerge.cli.options`)."""

    name: str
    annotation: Any
    methods: tuple[str, ...]


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


def takes_spec(annotation: Any) -> bool:
    """An int or float option (also optional): one that takes a coefficient spec (merging/coefficients.py)."""
    return unwrap_optional(annotation) in (int, float)


def unwrap_optional(annotation: Any) -> Any:
    """X for `X | None`, else the annotation itself."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation


def _type_label(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
