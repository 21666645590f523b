"""The grid of `vlmerge tune`: one `GridAxis` per searched option (`lam=0.3:1.0:8`, evenly spaced and
inclusive, or `scope=tensor,global`), typed as the option is, and every point checked by the method's
options class (names, types, bounds) before anything is merged."""

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import Any, Literal, Self, Union, get_args, get_origin

from vlmerge.core.errors import ConfigError
from vlmerge.core.registry import suggest
from vlmerge.merging import MERGE_METHODS, method_options
from vlmerge.merging.coefficients import parse_options, resolve_options
from vlmerge.merging.plan import MergePlan

SIGNIFICANT_DIGITS = 12  # grid points are rounded so that 0.3:1.0:8 gives 0.4, not 0.39999999999999997
MAX_CANDIDATES = 10_000  # each candidate is a merge and an evaluation: a bigger grid is a typo, not a plan


@dataclass(frozen=True)
class GridAxis:
    """The values one option takes in the search, typed as the option is (float, int, bool, choice)."""

    name: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str, method: str) -> Self:
        """`NAME=START:STOP:COUNT` (COUNT evenly spaced points, both ends included; numeric options)
        or `NAME=A,B,C`; NAME as in `--option` (`random-seed` is `random_seed`)."""
        name, equals, spec = text.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or not name:
            raise ConfigError(f"--grid {_shown(text)}: expected NAME=START:STOP:COUNT or NAME=A,B,C")
        kind = _option_kind(method, name)
        where = f"--grid {_shown(text)}"
        if not spec.strip():
            raise ConfigError(f"{where}: the grid is empty; give NAME=START:STOP:COUNT or NAME=A,B,C")
        if ":" in spec and kind in (int, float):
            values = _linspace(spec, kind, where)
        else:
            items = spec.split(",")
            if len(items) > MAX_CANDIDATES:
                raise ConfigError(
                    f"{where}: more than {MAX_CANDIDATES} values; tune scores at most that many candidates"
                )
            values = tuple(_scalar(item.strip(), kind, where) for item in items)
        repeated = [value for value, times in Counter(values).items() if times > 1]
        if repeated:
            raise ConfigError(f"{where}: gives {repeated[0]!r} more than once")
        return cls(name, values)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values)}


def parse_grid(texts: Sequence[str | GridAxis], method: str, fixed: Mapping[str, Any] | None = None) -> list[GridAxis]:
    """The axes of `--grid` flags (or given as GridAxis), checked against each other and the fixed options."""
    MERGE_METHODS.get(method)  # an unknown method is named before its options are looked for
    axes = [text if isinstance(text, GridAxis) else GridAxis.parse(text, method) for text in texts]
    if not axes:
        raise ConfigError(f"the grid is empty: give --grid NAME=... for at least one option of {method}")
    names = [axis.name for axis in axes]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise ConfigError(f"--grid names {name!r} twice; give all its values in one --grid")
    check_grid_size(axes)
    fixed_names = {key.replace("-", "_") for key in fixed or {}}
    both = [name for name in names if name in fixed_names]
    if both:
        raise ConfigError(f"option {both[0]!r} is both fixed and searched; drop one of the two")
    return axes


def check_grid_size(axes: Sequence[GridAxis]) -> int:
    """The number of candidates, the product of the axes' lengths, computed before any is made;
    one error above MAX_CANDIDATES."""
    size = math.prod(len(axis.values) for axis in axes)
    if size > MAX_CANDIDATES:
        lengths = " x ".join(str(len(axis.values)) for axis in axes)
        raise ConfigError(
            f"the grid has {size} candidates ({lengths}); tune scores at most {MAX_CANDIDATES}: search fewer points"
        )
    return size


def grid_points(axes: Sequence[GridAxis], method: str, fixed: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every point of the grid, the fixed options beside it, in the product's order (the last axis
    fastest). Each value is checked by the method's options first, alone, so that an error names it;
    coefficient specs among the fixed options are checked tensor by tensor by `candidate_options`."""
    check_grid_size(axes)
    merge_method = MERGE_METHODS.get(method)
    fixed = {key.replace("-", "_"): value for key, value in (fixed or {}).items()}
    parse_options(merge_method, fixed)
    for axis in axes:
        for value in axis.values:
            try:
                parse_options(merge_method, {**fixed, axis.name: value})
            except ConfigError as error:
                raise ConfigError(f"--grid {axis.name}={value}: {error}") from None
    names = [axis.name for axis in axes]
    return [{**fixed, **dict(zip(names, values))} for values in itertools.product(*(a.values for a in axes))]


def candidate_options(method: str, points: Sequence[Mapping[str, Any]], plan: MergePlan) -> list[dict[str, Any]]:
    """Each point's options as its merge records them (every option, defaults filled in, specs as
    given), validated at every merged tensor of `plan`: no value out of bounds reaches a merge."""
    return [resolve_options(MERGE_METHODS.get(method), point, plan).given for point in points]


def _option_kind(method: str, name: str) -> Any:
    """What a grid value of option `name` is parsed as: float, int, bool, str, or a tuple of choices."""
    fields = MERGE_METHODS.get(method).options.model_fields
    if name not in fields:
        others = method_options().get(name)
        if others is not None:
            raise ConfigError(
                f"method {method!r} has no option {name!r} (an option of {', '.join(others.methods)}); "
                f"its options: {', '.join(fields) or 'none'}"
            )
        raise ConfigError(f"unknown option {name!r} of method {method!r}{suggest(name, list(fields))}")
    annotation = fields[name].annotation
    kinds = (
        [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType)
        else [annotation]
    )
    for kind in kinds:
        if get_origin(kind) is Literal:
            return tuple(get_args(kind))
        if isinstance(kind, type) and issubclass(kind, Enum):
            return tuple(member.value for member in kind)
    for scalar in (bool, float, int, str):  # bool first: a bool option takes true/false, not numbers
        if scalar in kinds:
            return scalar
    raise ConfigError(f"option {name!r} of {method!r} takes JSON; give it as a fixed --option, not a grid")


def _shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, shortened: a grid may be thousands of values long."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def _scalar(text: str, kind: Any, where: str) -> Any:
    if not text:
        raise ConfigError(f"{where}: an empty value in the list")
    if isinstance(kind, tuple):
        matches = [choice for choice in kind if str(choice) == text]
        if not matches:
            raise ConfigError(f"{where}: {_shown(text)} is not a choice of the option ({', '.join(map(str, kind))})")
        return matches[0]
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{where}: {_shown(text)} is not true or false")
        return text.lower() == "true"
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{where}: {_shown(text)} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):  # an int of any size is exact: no float to overflow
        raise ConfigError(f"{where}: {_shown(text)} is not a finite number")
    return value


def _linspace(spec: str, kind: type, where: str) -> tuple[Any, ...]:
    parts = spec.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{where}: a range is START:STOP:COUNT")
    start, stop = (_scalar(part.strip(), kind, where) for part in parts[:2])
    count = _scalar(parts[2].strip(), int, where)
    if count < 2:
        raise ConfigError(f"{where}: a range needs a COUNT of at least 2; give one value as NAME=VALUE")
    if count > MAX_CANDIDATES:
        raise ConfigError(f"{where}: a COUNT above {MAX_CANDIDATES}; tune scores at most that many candidates")
    if kind is int:  # exact: integers of any size, no float in between
        step, rest = divmod(stop - start, count - 1)
        if rest:
            raise ConfigError(f"{where}: the {count} evenly spaced points are not all integers")
        return tuple(start + step * i for i in range(count))
    points = [start + (stop - start) * i / (count - 1) for i in range(count)]
    if not all(math.isfinite(point) for point in points):
        raise ConfigError(f"{where}: the range's width overflows a float; give a narrower range")
    return tuple(float(f"{point:.{SIGNIFICANT_DIGITS}g}") for point in points)
