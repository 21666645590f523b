"""What a checkpoint holds: layout, layers, experts, parameter counts, and the merge plan with the
options each merged tensor gets (for `vlmerge inspect`)."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmerge.core.keys import parse_block_path
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.io.layout import layout_reason
from vlmerge.merging.coefficients import ResolvedOptions, resolve_options, role_of
from vlmerge.merging.plan import MergePlan, build_merge_plan, parse_expert_key
from vlmerge.merging.registry import MERGE_METHODS
from vlmerge.merging.request import MergeRequest


@dataclass
class CheckpointSummary:
    path: str
    layout: str
    layout_reason: str  # the key that shows the layout's pattern
    unused: list[str]  # keys the family stores but its forward never reads
    num_tensors: int
    num_layers: int
    fusion_layer: int | None
    expert_slots: list[str]
    layer_experts: dict[int, list[str]]
    parameters: int
    backbone_parameters: int
    merged_parameters: int | None  # after merging every expert group into one tensor
    config: dict[str, Any] | None
    provenance: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return vars(self)


def summarize(reader: CheckpointReader) -> CheckpointSummary:
    keys = reader.keys
    experts = [e for e in map(parse_expert_key, keys) if e is not None]
    block_paths = {k: path for k in keys if (path := parse_block_path(k)) is not None}
    layers = {path.layer for path in block_paths.values()}
    total = sum(reader.numel(k) for k in keys)
    backbone = sum(reader.numel(k) for k in block_paths)
    merged = None
    layer_experts: dict[int, list[str]] = {}
    if experts:
        plan = build_merge_plan({k: reader.shape(k) for k in keys})
        merged = total - sum(reader.numel(e.key) for g in plan.groups for e in list(g.experts.values())[1:])
        layer_experts = {layer: sorted(m.value for m in mods) for layer, mods in plan.layer_experts.items()}
    fusion = min((layer for layer, mods in layer_experts.items() if "vl" in mods), default=None)
    merge_record = reader.metadata.get("merge")
    return CheckpointSummary(
        str(reader.path),
        reader.layout.value,
        layout_reason(reader.mapping.stored_keys(), reader.layout),
        sorted(reader.mapping.unused),
        len(keys),
        len(layers),
        fusion,
        sorted({e.slot for e in experts}),
        layer_experts,
        total,
        backbone,
        merged,
        reader.config,
        json.loads(merge_record) if merge_record else None,
    )


def format_summary(summary: CheckpointSummary) -> str:
    lines = [
        f"{summary.path}",
        f"  layout        {summary.layout} ({summary.layout_reason})",
        f"  tensors       {summary.num_tensors}",
        f"  layers        {summary.num_layers}",
        f"  kind          {'modality-specific' if summary.expert_slots else 'modality-agnostic'}",
        f"  parameters    {summary.parameters:,} (blocks {summary.backbone_parameters:,})",
    ]
    if summary.expert_slots:
        lines += [
            f"  expert slots  {', '.join(summary.expert_slots)}",
            f"  fusion layer  {summary.fusion_layer}",
            f"  merged size   {summary.merged_parameters:,} parameters "
            f"({summary.merged_parameters / summary.parameters:.1%} of this checkpoint)",
        ]
        lines += [f"  layer {layer:>2}      experts {', '.join(mods)}" for layer, mods in summary.layer_experts.items()]
    if summary.unused:
        lines.append(
            f"  unused        {', '.join(summary.unused)} (read and passed through; the family never reads them)"
        )
    if summary.provenance:
        lines.append(
            f"  merged by     {summary.provenance['method']} {json.dumps(summary.provenance['options'])} "
            f"selection={summary.provenance.get('selection', summary.provenance.get('experts'))}"
        )
    return "\n".join(lines)


def describe_plan(
    reader: CheckpointReader,
    request: MergeRequest,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """The merge plan of a checkpoint (`reader`, opened from `request.source`) for the request's expert
    selection and, given a method, the value every option takes at each merged tensor (its specs
    resolved and checked as a merge would, reading no tensor)."""
    plan = build_merge_plan({k: reader.shape(k) for k in reader.keys}, request.selection)
    if method is None:
        return plan.describe()
    resolved = resolve_options(MERGE_METHODS.get(method), dict(options or {}), plan)
    return f"{plan.describe()}\n{format_option_values(plan, resolved)}"


def format_option_values(plan: MergePlan, options: ResolvedOptions) -> str:
    """One line per merged tensor: layer, role, the experts merged, and every option's value there."""
    given = ", ".join(f"{name}={json.dumps(value)}" for name, value in options.given.items())
    lines = [f"{options.method} options as given: {given or 'none'}"]
    width = max(len(group.target) for group in plan.groups)
    for group in plan.groups:
        experts = ", ".join(m.value for m in group.experts)
        where = f"  {group.target:<{width}}  layer {group.layer:>2}  {role_of(group.slot) or '-':<4}  {experts:<9}"
        if len(group.experts) == 1:
            lines.append(f"{where}  copied (one expert)")
            continue
        values = " ".join(f"{name}={json.dumps(value)}" for name, value in options.values_at(group.target).items())
        lines.append(f"{where}  {values}")
    return "\n".join(lines)
