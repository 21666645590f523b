"""Coefficient specs: a scalar merge option that varies by role, by expert, or as a gradient over depth.

Every int or float option of a merge method takes, besides one number:

    [0.2, 0.8]                                   a gradient over depth: the values spaced evenly from the
                                                 first layer to the last, linear between neighbours
    {"attn": 0.3, "mlp": [0.2, 0.8], "default": 0.5}    by role: attn, mlp, norm, default
    {"v": 1.0, "l": 0.5, "default": 0.7}                by expert: v, l, vl, default (see below)

The values of a dict are specs again: a role dict may hold gradients and expert dicts, an expert dict
gradients and role dicts (each kind of dict once on a path). A role or expert a dict leaves out, and that
has no `default` there, takes the option's default. The gradient is mergekit's: layer i of a model of L
layers sits at t = i / (L - 1) (t = 1 for one layer), the n values at t = 0, 1/(n-1), ..., 1; L counts the
model's layers, merged or not.

Roles are by block slot: `attn` is everything in the attention module (qkv, the q and v biases, the output
projection), `mlp` the feed-forward layers, `norm` norm1 and norm2. Any other slot has no role and takes a
role dict's `default` (layer scale, gamma_*, is shared by the experts and passes through unmerged).

By expert: for the options a method declares per expert (`register_method(per_expert=...)`), each expert
of a merged tensor, one "model" in mergekit's terms, gets its own value: λ_m in θ_0 + Σ_m λ_m τ_m', the
density of its own sparsification. An expert dict for any other option is a ConfigError.

The engine parses the specs before the plan, resolves them against it and validates every merged tensor's
values with the method's own options class before any tensor is read, so a value out of bounds at one layer
is one error naming option, tensor and value. Methods stay pure: each merged tensor gets an ordinary options
object, in which a per-expert option holds a mapping modality -> value (a number where one was given).
"""

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from vlmerge.core.config import StrictConfig, describe_validation_error
from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import ALL_MODALITIES, Modality
from vlmerge.core.registry import suggest
from vlmerge.merging.plan import MergeGroup, MergePlan
from vlmerge.merging.registry import MergeMethod, takes_spec

ROLES = ("attn", "mlp", "norm")
EXPERTS = tuple(m.value for m in ALL_MODALITIES)
DEFAULT = "default"
MAX_DEPTH = 6  # nested dicts and lists; a meaningful spec needs 3 (roles, experts, a gradient)
_FLOAT_MAX = int(sys.float_info.max)  # an int above it overflows the float a gradient interpolates in

T = TypeVar("T")


def role_of(slot: str) -> str | None:
    """The role of a block slot: attn, mlp, norm (norm1, norm2), or None (no role: a dict's default)."""
    if slot in ("attn", "mlp"):
        return slot
    return "norm" if slot.startswith("norm") else None


def depth_position(layer: int, num_layers: int) -> float:
    """Where a layer sits on a gradient: i / (L - 1), 1 in a one-layer model (mergekit's choice)."""
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """The value at t in [0, 1] of `values` spaced evenly over [0, 1], linear between neighbours."""
    scaled = t * (len(values) - 1)
    low = min(int(scaled), len(values) - 1)
    high = min(low + 1, len(values) - 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def at_expert(value: Any, modality: Modality) -> Any:
    """A per-expert option's value for one expert: its own, or the one value all share."""
    return value[modality] if isinstance(value, Mapping) else value


def expert_values(value: Any) -> list[Any]:
    """Every value a per-expert option takes: each expert's, or the one value."""
    return list(value.values()) if isinstance(value, Mapping) else [value]


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Constant:
    value: Any  # as given: the options class parses and checks it (text from the command line too)

    def given(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Gradient:
    values: tuple[float, ...]

    def given(self) -> list[float]:
        return list(self.values)


@dataclass(frozen=True)
class ByRole:
    entries: Mapping[str, "Spec"]  # attn, mlp, norm, default

    def given(self) -> dict[str, Any]:
        return {key: spec.given() for key, spec in self.entries.items()}


@dataclass(frozen=True)
class ByExpert:
    entries: Mapping[str, "Spec"]  # v, l, vl, default

    def given(self) -> dict[str, Any]:
        return {key: spec.given() for key, spec in self.entries.items()}


Spec = Constant | Gradient | ByRole | ByExpert


@dataclass(frozen=True)
class Site:
    """What a spec's value depends on: where a merged tensor sits, and which experts it merges."""

    target: str
    layer: int
    num_layers: int
    role: str | None
    experts: tuple[Modality, ...]

    @classmethod
    def of(cls, group: MergeGroup, num_layers: int) -> "Site":
        return cls(group.target, group.layer, num_layers, role_of(group.slot), tuple(group.experts))


_NO_DEFAULT = object()


def resolve(spec: Spec, site: Site, default: Any = _NO_DEFAULT, option: str = "option") -> Any:
    """The value `spec` gives at `site`: a number, or, under an expert dict, a dict modality -> number
    over the site's experts. What a dict leaves out takes `default` (a ConfigError where there is none)."""
    if isinstance(spec, Constant):
        return spec.value
    if isinstance(spec, Gradient):
        return interpolate(spec.values, depth_position(site.layer, site.num_layers))
    if isinstance(spec, ByRole):
        return resolve(_entry(spec, site.role, site, default, option), site, default, option)
    return {m: resolve(_entry(spec, m.value, site, default, option), site, default, option) for m in site.experts}


def _entry(spec: ByRole | ByExpert, key: str | None, site: Site, default: Any, option: str) -> Spec:
    found = spec.entries.get(key) if key is not None else None
    if found is None:
        found = spec.entries.get(DEFAULT)
    if found is not None:
        return found
    if default is _NO_DEFAULT:
        what = f"expert {key}" if isinstance(spec, ByExpert) else f"role {key}" if key else "its slot (no role)"
        add = f"{key!r} or 'default'" if key else "'default'"
        raise ConfigError(f"option {option} gives no value for {what} at {site.target} and has no default; add {add}")
    return Constant(default)


def parse_spec(
    raw: Any, option: str, method: MergeMethod, _inside: frozenset[str] = frozenset(), _depth: int = 0
) -> Spec:
    """A spec from its JSON/YAML/Python form; every structural problem is one ConfigError. Nesting
    is bounded (MAX_DEPTH) before it is followed, so no spec, however deep, exhausts the stack."""
    where = f"{method.name} option {option}"
    if isinstance(raw, list | tuple | Mapping) and _depth >= MAX_DEPTH:
        raise ConfigError(
            f"{where}: nested more than {MAX_DEPTH} deep; a spec needs at most a dict by role, "
            "a dict by expert and a gradient"
        )
    if isinstance(raw, list | tuple):
        if len(raw) < 2:
            raise ConfigError(
                f"{where}: a gradient over depth needs at least 2 values, got {list(raw)}; give one value as a number"
            )
        return Gradient(tuple(_number(value, where) for value in raw))
    if isinstance(raw, Mapping):
        return _parse_dict(raw, option, method, _inside, _depth + 1)
    return Constant(_number(raw, where) if _inside or _is_int(raw) else raw)


def _parse_dict(
    raw: Mapping, option: str, method: MergeMethod, inside: frozenset[str], depth: int
) -> ByRole | ByExpert:
    where = f"{method.name} option {option}"
    keys = [str(key) for key in raw]
    if not keys:
        raise ConfigError(f"{where}: an empty dict; give roles ({', '.join(ROLES)}) or experts ({', '.join(EXPERTS)})")
    for key in keys:
        if key not in (*ROLES, *EXPERTS, DEFAULT):
            raise ConfigError(
                f"{where}: unknown key {key!r}, neither a role nor an expert{suggest(key, [*ROLES, *EXPERTS, DEFAULT])}"
            )
    roles, experts = [k for k in keys if k in ROLES], [k for k in keys if k in EXPERTS]
    if roles and experts:
        raise ConfigError(
            f"{where}: mixes roles ({', '.join(roles)}) and experts ({', '.join(experts)}) in one dict; "
            f'nest one in the other, e.g. {{"{roles[0]}": {{"{experts[0]}": ...}}}}'
        )
    kind = "experts" if experts else "roles" if roles else None  # None: only a default, of either kind
    if kind == "experts" and option not in method.per_expert:
        declared = ", ".join(sorted(method.per_expert)) or "none"
        raise ConfigError(
            f"{where}: {method.name} applies {option} to each merged tensor as a whole, so it takes no value per "
            f"expert ({', '.join(experts)}); options {method.name} takes per expert: {declared}"
        )
    if kind in inside:
        raise ConfigError(f"{where}: a dict by {kind} inside another dict by {kind}")
    below = inside | {kind} if kind else inside
    entries = {str(key): parse_spec(value, option, method, below, depth) for key, value in raw.items()}
    return ByExpert(entries) if kind == "experts" else ByRole(entries)


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number in a gradient or dict, got {_short(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:
        raise ConfigError(f"{where}: an integer of {len(str(abs(value)))} digits, beyond the range of a float")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """A value for a message: a container by its type (its repr could be huge, or nest too deep)."""
    if isinstance(value, list | tuple | Mapping):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- a method's options
@dataclass(frozen=True)
class OptionSpecs:
    """A method's options as given: plain values (for its options class), and the ones given as specs."""

    method: MergeMethod
    plain: dict[str, Any]
    specs: dict[str, Spec]

    def resolve(self, plan: MergePlan) -> "ResolvedOptions":
        """The options object of every merged tensor of `plan`, each validated by the options class."""
        merged = [g for g in plan.groups if len(g.experts) > 1] or plan.groups[:1]
        built: dict[str, tuple[StrictConfig, StrictConfig, dict[str, Any]]] = {}
        by_target, values = {}, {}
        for group in merged:
            site = Site.of(group, plan.num_layers)
            raw = {name: resolve(spec, site, self._default(name), name) for name, spec in self.specs.items()}
            key = json.dumps({name: _jsonable(value) for name, value in raw.items()}, sort_keys=True)
            if key not in built:
                built[key] = self._options_at(raw, site)
            by_target[group.target], _, values[group.target] = built[key]
        reference = next(iter(built.values()))[1]
        given = {**reference.model_dump(mode="json"), **{name: spec.given() for name, spec in self.specs.items()}}
        return ResolvedOptions(self.method.name, given, tuple(self.specs), reference, by_target, values)

    def _default(self, name: str) -> Any:
        field = self.method.options.model_fields[name]
        return _NO_DEFAULT if field.is_required() else field.get_default(call_default_factory=True)

    def _options_at(self, raw: dict[str, Any], site: Site) -> tuple[StrictConfig, StrictConfig, dict[str, Any]]:
        """(the method's options object, a plain validated one, the JSON value of each spec) at one tensor."""
        per_expert = [name for name, value in raw.items() if isinstance(value, dict)]
        if not per_expert:
            options = self._validate(raw, site)
            return options, options, {name: _jsonable(getattr(options, name)) for name in raw}
        by_expert = {
            m: self._validate({n: v[m] if n in per_expert else v for n, v in raw.items()}, site, m)
            for m in site.experts
        }
        first = by_expert[site.experts[0]]
        fields = {name: getattr(first, name) for name in type(first).model_fields}
        fields.update({name: {m: getattr(o, name) for m, o in by_expert.items()} for name in per_expert})
        # validated expert by expert above: the options class holds each value, not the mapping
        options = type(first).model_construct(first.model_fields_set | set(per_expert), **fields)
        return options, first, {name: _jsonable(fields[name]) for name in raw}

    def _validate(self, raw: dict[str, Any], site: Site, expert: Modality | None = None) -> StrictConfig:
        try:
            return self.method.options.model_validate({**self.plain, **raw})
        except ValidationError as error:
            items = error.errors()
            named = {str(item["loc"][0]) for item in items if item["loc"]}
            shown = [n for n in raw if n in named] or (list(raw) if any(not i["loc"] for i in items) else [])
            there = ", ".join(
                f"{n}={json.dumps(_jsonable(raw[n]))} from {json.dumps(self.specs[n].given())}" for n in shown
            )
            for_expert = f" for expert {expert.value}" if expert is not None else ""
            raise ConfigError(
                f"{self.method.name} options at {site.target}{for_expert}: "
                f"{describe_validation_error(self.method.options, error)}" + (f" ({there})" if there else "")
            ) from None


def parse_options(method: MergeMethod, options: Mapping[str, Any]) -> OptionSpecs:
    """Split a method's options into plain values and specs (lists and dicts given to int and float
    options), checking every spec's structure and every other option as the options class does."""
    fields = method.options.model_fields
    specs, plain = {}, {}
    for name, raw in options.items():
        if name in fields and takes_spec(fields[name].annotation) and isinstance(raw, list | tuple | Mapping):
            specs[name] = parse_spec(raw, name, method)
        else:
            plain[name] = raw
    if not specs:
        method.options.parse(plain, where=f"{method.name} options")
    else:
        for name in plain:  # values are checked tensor by tensor, names now
            if name not in fields:
                raise ConfigError(f"{method.name} options: unknown field {name!r}{suggest(name, list(fields))}")
    return OptionSpecs(method, plain, specs)


def resolve_options(method: MergeMethod, options: Mapping[str, Any], plan: MergePlan) -> "ResolvedOptions":
    """`parse_options` then `OptionSpecs.resolve`: every merged tensor's options, before any tensor is read."""
    return parse_options(method, options).resolve(plan)


@dataclass(frozen=True)
class ResolvedOptions:
    """The options each merged tensor of a plan gets, and the spec they came from."""

    method: str
    given: dict[str, Any]  # every option (defaults filled in), specs as given: JSON
    varying: tuple[str, ...]  # the options given as specs
    reference: StrictConfig  # a validated options object: the value of every option not given as a spec
    by_target: dict[str, StrictConfig]  # merged tensor -> its options object
    values: dict[str, dict[str, Any]]  # merged tensor -> the JSON value of each spec there

    def at(self, target: str) -> StrictConfig:
        """The options object of a merged tensor (the reference for a tensor copied from its one expert)."""
        return self.by_target.get(target, self.reference)

    def values_at(self, target: str) -> dict[str, Any]:
        """Every option's JSON value at a merged tensor."""
        return {**self.given, **self.values.get(target, {})}

    def record(self) -> dict[str, list[dict[str, Any]]]:
        """Per option given as a spec, its distinct values, each with the merged tensors that take it."""
        record = {}
        for name in self.varying:
            distinct: dict[str, dict[str, Any]] = {}
            for target, values in self.values.items():
                entry = distinct.setdefault(json.dumps(values[name], sort_keys=True), {"value": values[name]})
                entry.setdefault("tensors", []).append(target)
            record[name] = list(distinct.values())
        return record

    def prepass(self, inputs: Iterable[T], model_wide: Sequence[str] | None) -> tuple[Iterator[T], StrictConfig]:
        """What a method's pre-pass over the whole model gets: the inputs, and one options object. The
        options it reads (`model_wide`; every option where None) must take one value over the model;
        that is checked when it first asks for inputs, before any tensor is read, so a pre-pass that
        reads none (TIES per tensor) takes any spec."""
        names = self.varying if model_wide is None else [name for name in model_wide if name in self.varying]
        options = self.at(next(iter(self.by_target), ""))
        update = {}
        for name in names:  # a per-expert value over every expert of the model, not the first tensor's
            values = [values[name] for values in self.values.values()]
            if any(isinstance(value, dict) for value in values):
                every = {Modality(k): v for value in values if isinstance(value, dict) for k, v in value.items()}
                shared = [value for value in values if not isinstance(value, dict)]
                update[name] = {m: every.get(m, shared[0] if shared else None) for m in ALL_MODALITIES}
                update[name] = {m: v for m, v in update[name].items() if v is not None}
        return self._checked(inputs, names), options.model_copy(update=update) if update else options

    def _checked(self, inputs: Iterable[T], names: Sequence[str]) -> Iterator[T]:
        for name in names:
            taken: dict[str, set[str]] = {}  # expert (or "*": every expert) -> the values it takes
            for values in self.values.values():
                value = values[name]
                for key, each in value.items() if isinstance(value, dict) else [("*", value)]:
                    taken.setdefault(key, set()).add(json.dumps(each))
            shared = taken.pop("*", set())
            distinct = [shared | found for found in taken.values()] or [shared]
            if any(len(found) > 1 for found in distinct):
                raise ConfigError(
                    f"the {self.method} pre-pass over the whole model takes one {name} (per expert), but "
                    f"{name} {json.dumps(self.given[name])} varies by tensor"
                )
        yield from inputs


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key.value if isinstance(key, Modality) else key): _jsonable(v) for key, v in value.items()}
    return value.value if isinstance(value, Modality) else value
