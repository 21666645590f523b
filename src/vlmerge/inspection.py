"""What a checkpoint holds: layout, layers, experts, parameter counts (for `vlmerge inspect`)."""

import json
from dataclasses import dataclass
from typing import Any

from vlmerge.core.keys import parse_block_path
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.merging.plan import build_merge_plan, parse_expert_key


@dataclass
class CheckpointSummary:
    path: str
    layout: str
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
        f"  layout        {summary.layout}",
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
    if summary.provenance:
        lines.append(
            f"  merged by     {summary.provenance['method']} {json.dumps(summary.provenance['options'])} "
            f"selection={summary.provenance.get('selection', summary.provenance.get('experts'))}"
        )
    return "\n".join(lines)
