"""The merge plan: which expert tensors become which merged tensor.

This is the only place that knows which experts a task uses. An expert tensor is a block path
(core/keys.py) with a modality; its merged key drops the `.{modality}` segment. Everything
else (embeddings, heads, layer scale, shared sub-modules) passes through.
The plan is built and validated from shapes alone, before any tensor is read.
"""

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from vlmerge.core.errors import MergeError
from vlmerge.core.keys import BlockPath, parse_block_path
from vlmerge.core.modality import Modality
from vlmerge.core.registry import suggest

LINEAR_SLOTS = frozenset({"attn", "mlp"})
MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what experts and seed tensors may be


class ExpertSelection(str, Enum):
    """Which experts a merge combines, by the downstream task the merged model serves."""

    ALL = "all"  # v and l below the fusion layer; v, l and vl from it on
    RETRIEVAL = "retrieval"  # dual encoder: v and l everywhere
    VQA = "vqa"  # fused tasks: vl in the fusion layers
    NLVR2 = "nlvr2"

    def choose(self, available: frozenset[Modality]) -> frozenset[Modality]:
        if self is ExpertSelection.ALL:
            return available
        if self is ExpertSelection.RETRIEVAL or Modality.VL not in available:
            return available & {Modality.V, Modality.L}
        return frozenset({Modality.VL})

    @classmethod
    def parse(cls, name: "str | ExpertSelection") -> "ExpertSelection":
        try:
            return cls(name)
        except ValueError:
            raise MergeError(f"unknown expert selection {name!r}{suggest(str(name), [s.value for s in cls])}") from None


def parse_expert_key(key: str) -> BlockPath | None:
    """The path of an expert's tensor (`blocks.3.attn.v.qkv.weight`); None for any other key."""
    path = parse_block_path(key)
    return path if path is not None and path.modality is not None and path.rest else None


def merged_key(key: str) -> str:
    """The key a tensor has in the modality-agnostic model: the expert segment dropped."""
    parsed = parse_expert_key(key)
    return parsed.merged().key if parsed else key


@dataclass(frozen=True)
class MergeGroup:
    """Expert tensors (one per modality) that become one merged tensor."""

    target: str
    layer: int
    slot: str
    experts: dict[Modality, BlockPath]
    shape: tuple[int, ...]

    @property
    def is_linear_weight(self) -> bool:
        """Linear layers are merged by RegMean with Gram matrices; all else is averaged."""
        return self.slot in LINEAR_SLOTS and self.target.endswith(".weight") and len(self.shape) == 2

    def gram_keys(self) -> dict[Modality, str]:
        return {m: e.module().key for m, e in self.experts.items()}


@dataclass(frozen=True)
class MergePlan:
    groups: list[MergeGroup]
    passthrough: list[str]
    dropped: list[str]  # expert tensors the selection leaves out
    selection: ExpertSelection
    num_layers: int
    layer_experts: dict[int, frozenset[Modality]] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return self.passthrough + [g.target for g in self.groups]

    def describe(self) -> str:
        lines = [
            f"selection {self.selection.value}: {len(self.groups)} merged tensors, "
            f"{len(self.passthrough)} passed through, {len(self.dropped)} expert tensors dropped"
        ]
        for layer, available in sorted(self.layer_experts.items()):
            used = self.selection.choose(available)
            lines.append(f"  layer {layer:>2}: experts {_names(available)} -> merge {_names(used)}")
        return "\n".join(lines)


def build_merge_plan(
    shapes: dict[str, tuple[int, ...]], selection: ExpertSelection | str = ExpertSelection.ALL
) -> MergePlan:
    """Group expert keys by merged key and check that every group is complete and consistent."""
    selection = ExpertSelection.parse(selection)
    by_target: dict[str, dict[Modality, BlockPath]] = defaultdict(dict)
    passthrough = []
    for key in shapes:
        parsed = parse_expert_key(key)
        if parsed is None:
            passthrough.append(key)
        else:
            by_target[parsed.merged().key][parsed.modality] = parsed
    if not by_target:
        raise MergeError(
            "no modality experts found (keys like blocks.0.attn.v.qkv.weight); "
            "is this already a modality-agnostic checkpoint?"
        )
    clash = sorted(set(by_target) & set(passthrough))
    if clash:
        raise MergeError(f"{clash[0]} exists both as a shared tensor and as per-modality experts")

    layer_experts = _experts_per_layer(by_target.values())
    groups, dropped = [], []
    for target, experts in sorted(by_target.items(), key=lambda item: _natural(item[0])):
        any_expert = next(iter(experts.values()))
        _check_complete(target, experts, layer_experts[any_expert.layer])
        chosen = selection.choose(layer_experts[any_expert.layer])
        dropped += [e.key for m, e in experts.items() if m not in chosen]
        selected = {m: experts[m] for m in sorted(chosen, key=_modality_order)}
        groups.append(
            MergeGroup(target, any_expert.layer, any_expert.slot, selected, _common_shape(target, selected, shapes))
        )
    num_layers = 1 + max(layer_experts)
    return MergePlan(groups, passthrough, dropped, selection, num_layers, layer_experts)


def _experts_per_layer(groups: Iterable[dict[Modality, BlockPath]]) -> dict[int, frozenset[Modality]]:
    found: dict[int, set[Modality]] = defaultdict(set)
    for experts in groups:
        for expert in experts.values():
            found[expert.layer].add(expert.modality)
    for layer, modalities in found.items():
        if not {Modality.V, Modality.L} <= modalities:
            missing = _names({Modality.V, Modality.L} - modalities)
            raise MergeError(f"layer {layer} is missing the {missing} expert(s); it has only {_names(modalities)}")
    return {layer: frozenset(m) for layer, m in found.items()}


def _check_complete(target: str, experts: dict[Modality, BlockPath], expected: frozenset[Modality]) -> None:
    missing = expected - set(experts)
    if missing:
        have = next(iter(experts.values())).key
        raise MergeError(
            f"missing expert for {target}: no {_names(missing)} tensor beside {have} "
            f"(layer experts: {_names(expected)})"
        )


def _common_shape(
    target: str, experts: dict[Modality, BlockPath], shapes: dict[str, tuple[int, ...]]
) -> tuple[int, ...]:
    found = {m: tuple(shapes[e.key]) for m, e in experts.items()}
    if len(set(found.values())) > 1:
        detail = ", ".join(f"{m.value} {list(s)}" for m, s in found.items())
        raise MergeError(f"experts of {target} differ in shape: {detail}")
    return next(iter(found.values()))


def _modality_order(modality: Modality) -> int:
    return [Modality.V, Modality.L, Modality.VL].index(modality)


def _names(modalities: Iterable[Modality]) -> str:
    return ", ".join(m.value for m in sorted(modalities, key=_modality_order)) or "none"


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def expand_to_experts(agnostic: Mapping[str, torch.Tensor], expert_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The inverse of a merge: every expert starts as a copy of the shared weight it would merge
    into (how modality-specific pre-training starts from the seed). Unknown keys fail by name."""
    state, missing = {}, []
    for key in expert_keys:
        source = merged_key(key)
        if source in agnostic:
            state[key] = agnostic[source].clone()
        else:
            missing.append(source)
    if missing:
        raise MergeError(f"the shared checkpoint lacks {len(missing)} tensor(s) the experts need, e.g. {missing[:3]}")
    return state
