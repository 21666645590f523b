"""Export a segmentation-fine-tuned merged model, backbone and UperNet head, as transformers'
`BeitForSemanticSegmentation`: its logits equal our head's 'decode' logits, up to float rounding.

The backbone is the BEiT tower of `vlmerge.export.huggingface` (relative position bias: the paper's
model, VLMo). Our `UperNetHead` is BEiT's own head, module for module:
- pyramid (x4: ConvTranspose, BatchNorm, GELU, ConvTranspose; x2: ConvTranspose; x1; x1/2: max pool)
  -> `fpn.fpn1` .. `fpn.fpn4`;
- each conv-BatchNorm-ReLU -> a `BeitConvLayer` (convolution, normalization, activation): the pyramid
  pooling branches -> `decode_head.psp_modules`, its bottleneck -> `psp_bottleneck`, laterals ->
  `lateral_convs`, the 3x3 convs of the top-down path -> `fpn_convs`, the fusion -> `fpn_bottleneck`;
- the auxiliary FCN (one 3x3 conv-BN-ReLU on the third level, then a 1x1 classifier) -> `auxiliary_head`
  (`auxiliary_num_convs=1`, no concatenated input), its loss weight and ignore index ours.
The pool scales are those the segmentation task builds (1, 2, 3, 6 cut to the coarsest grid): the head
stores one branch per scale but not the scales, so the branch count is checked against them.

Which hidden states feed the head: `BeitForSemanticSegmentation` reads out index i from hidden_states[i - 1],
and hidden_states[0] is the embeddings, so block b's output (0-based) is out index b + 2; out indices stop
at the layer count, so naming our last block takes one layer more. That layer is an exact identity (its
attention output and fc2 weights and biases zero: x + 0 + 0), so `last_hidden_state` is ours too.

Refused, in one error naming every reason, rather than exported as something else: absolute image
positions (they export to ViTModel, which transformers has no segmentation model for), the linear
probe head (BatchNorm and a 1x1 convolution over the final-normed last block: BEiT decodes with UperNet
only), a head whose channels are not the model width (BEiT's UperNet is as wide as the model), a head
whose tensors are not the task's UperNet over this config (other pool scales), and fewer than four
distinct blocks (a depth below 4: BEiT's out indices must differ).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmerge.core.errors import CheckpointError
from vlmerge.export.huggingface import (
    VERIFY_IMAGES,
    _beit_config,
    _beit_weights,
    _check_keys,
    _exported_from,
    _float32,
    _pixels,
    _transformers,
    export_architecture,
)
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.models.checkpoint import head_names
from vlmerge.models.config import ModelConfig
from vlmerge.models.heads import UperNetHead, segmentation_blocks
from vlmerge.models.transformer import VLTransformer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ARCHITECTURE = "BeitForSemanticSegmentation"
# What the layers above `export` name (tasks.finetune.TASK_HEAD, the segmentation task's name, its
# AUX_WEIGHT, data.sources.IGNORE_LABEL), restated here because export sits below them.
TASK_HEAD = "head"
SEGMENTATION_TASK = "segmentation"
AUX_WEIGHT = 0.4
IGNORE_LABEL = 255
PROBE_KEYS = frozenset(
    [f"norm.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    + ["classify.weight", "classify.bias"]
)
FIRST_OUT_INDEX = 2  # block 0's output is BEiT's out index 2 (hidden_states[1])

# Our UperNet's modules -> BeitForSemanticSegmentation's; True: a conv-BatchNorm-ReLU, whose
# Sequential indices 0 and 1 are a BeitConvLayer's convolution and normalization.
HEAD_MODULES: tuple[tuple[str, str, bool], ...] = (
    (r"pyramid\.0\.0", "fpn.fpn1.conv_transpose1", False),
    (r"pyramid\.0\.1", "fpn.fpn1.normalization", False),
    (r"pyramid\.0\.3", "fpn.fpn1.conv_transpose2", False),
    (r"pyramid\.1", "fpn.fpn2", False),
    (r"ppm\.(\d+)\.1", r"decode_head.psp_modules.blocks.\1.conv", True),
    (r"ppm_bottleneck", "decode_head.psp_bottleneck", True),
    (r"lateral\.(\d+)", r"decode_head.lateral_convs.\1", True),
    (r"fpn\.(\d+)", r"decode_head.fpn_convs.\1", True),
    (r"fuse", "decode_head.fpn_bottleneck", True),
    (r"classify", "decode_head.classifier", False),
    (r"aux\.0", "auxiliary_head.convs.0", True),
    (r"aux\.1", "auxiliary_head.classifier", False),
)
CONV_NORM_ACT = {"0": "convolution", "1": "normalization"}
IDENTITY_ONES = ("layernorm_before.weight", "layernorm_after.weight", "lambda_1", "lambda_2")


@dataclass(frozen=True)
class SegmentationPlan:
    """The head's structure, read from the checkpoint's shapes and checked to map onto BEiT's."""

    classes: int
    channels: int
    blocks: tuple[int, ...]  # whose outputs feed the pyramid, finest level first
    pool_scales: tuple[int, ...]

    @property
    def out_indices(self) -> tuple[int, ...]:
        return tuple(block + FIRST_OUT_INDEX for block in self.blocks)


def segmentation_plan(reader: CheckpointReader, config: ModelConfig) -> SegmentationPlan | None:
    """The plan for a checkpoint that carries a segmentation head (fine-tuned for the task, or a task
    head with a per-pixel, 4-D classifier, as a merged file keeps it), None for any other; one error
    naming every reason it cannot map exactly. Reads shapes only."""
    if TASK_HEAD not in head_names(reader):
        return None
    prefix = f"{TASK_HEAD}."
    stored = {key.removeprefix(prefix): tuple(reader.shape(key)) for key in reader.keys if key.startswith(prefix)}
    classifier = stored.get("classify.weight", ())
    if reader.metadata.get("task") != SEGMENTATION_TASK and len(classifier) != 4:
        return None
    problems = [] if export_architecture(config) == "BeitModel" else [_absolute_positions(config)]
    plan, head_problems = _head_plan(config, stored)
    if problems or head_problems:
        raise CheckpointError(
            f"{reader.path}: cannot export the segmentation model to transformers' {ARCHITECTURE}: "
            f"{'; '.join(problems + head_problems)} (export_hf(..., task_head=False) exports the image tower alone)"
        )
    return plan


def _head_plan(config: ModelConfig, stored: Mapping[str, tuple]) -> tuple[SegmentationPlan | None, list[str]]:
    """The plan for the head whose tensors have the shapes `stored`, with every reason it does not map."""
    classifier = stored.get("classify.weight", ())
    if set(stored) == PROBE_KEYS:
        return None, [
            "its head is the linear probe (BatchNorm and a 1x1 convolution over the last block through the "
            "final norm), which BEiT, decoding with UperNet and an FCN only, has no counterpart for"
        ]
    if len(classifier) != 4:
        return None, [f"its head has no 1x1 classifier 'classify.weight' (found {sorted(stored)[:3]}...)"]
    plan = _plan(config, classifier[0], classifier[1])
    return plan, _head_problems(config, plan, stored)


def _absolute_positions(config: ModelConfig) -> str:
    return (
        f"{ARCHITECTURE} is BEiT, with a relative position bias (the paper's model, VLMo); this {config.family} "
        "model's absolute image positions export to ViTModel, which transformers has no segmentation model for"
    )


def _plan(config: ModelConfig, classes: int, channels: int) -> SegmentationPlan:
    """The plan for the head the segmentation task builds for `config` (`make_head`), `channels` wide."""
    with torch.device("meta"):  # structure only: no memory
        head = _task_head(config, classes, channels)
    return SegmentationPlan(classes, channels, head.blocks, head.pool_scales)


def _task_head(config: ModelConfig, classes: int, channels: int) -> UperNetHead:
    grid = config.image_size // config.patch_size
    return UperNetHead(config.width, classes, segmentation_blocks(config.depth), grid, channels=channels)


def _head_problems(config: ModelConfig, plan: SegmentationPlan, stored: Mapping[str, tuple]) -> list[str]:
    problems = []
    if len(set(plan.blocks)) != len(plan.blocks):
        problems.append(
            f"the head reads blocks {plan.blocks} of {config.depth}, and BEiT's out_indices must differ "
            "(a depth of at least 4)"
        )
    if plan.channels != config.width:
        problems.append(
            f"the head is {plan.channels} channels wide, and BEiT's UperNet and FCN are as wide as the model "
            f"({config.width})"
        )
    with torch.device("meta"):
        expected = {
            key: tuple(value.shape)
            for key, value in _task_head(config, plan.classes, plan.channels).state_dict().items()
        }
    if stored != expected:
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        shaped = sorted(key for key in set(stored) & set(expected) if stored[key] != expected[key])
        grid = config.image_size // config.patch_size
        problems.append(
            f"its tensors are not those of the UperNet the segmentation task builds for this config (pool scales "
            f"{plan.pool_scales} on a {grid}x{grid} grid): missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shaped differently {[(key, stored[key]) for key in shaped[:3]]}"
        )
    return problems


def read_head(reader: CheckpointReader, config: ModelConfig, plan: SegmentationPlan) -> UperNetHead:
    """The checkpoint's UperNet head, in eval mode (BatchNorm on its running statistics)."""
    head = _task_head(config, plan.classes, plan.channels)
    prefix = f"{TASK_HEAD}."
    head.load_state_dict({key: reader.get(prefix + key) for key in head.state_dict()}, strict=True)
    return head.eval()


def segmentation_model(
    config: ModelConfig, state: Mapping[str, torch.Tensor], head: UperNetHead, plan: SegmentationPlan
) -> "PreTrainedModel":
    """A `BeitForSemanticSegmentation` (eval mode) whose logits equal `head`'s 'decode' logits over
    the outputs of its blocks in `VLTransformer(config)` with weights `state`."""
    transformers = _transformers()
    _check_keys(config, state)
    model = transformers.BeitForSemanticSegmentation(transformers.BeitConfig(**_config(config, plan)))
    weights = {f"beit.{key}": value for key, value in _beit_weights(config, state).items()}
    weights |= _identity_layers(model.state_dict(), config.depth)
    weights |= head_weights(head)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _config(config: ModelConfig, plan: SegmentationPlan) -> dict[str, Any]:
    return _beit_config(config) | {
        "num_hidden_layers": max(config.depth, *plan.out_indices),  # one identity layer past ours, if needed
        "out_indices": list(plan.out_indices),
        "pool_scales": list(plan.pool_scales),
        "num_labels": plan.classes,
        "use_auxiliary_head": True,
        "auxiliary_channels": plan.channels,
        "auxiliary_num_convs": 1,
        "auxiliary_concat_input": False,
        "auxiliary_loss_weight": AUX_WEIGHT,
        "semantic_loss_ignore_index": IGNORE_LABEL,
    }


def _identity_layers(fresh: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """BEiT layers from `depth` on as exact identities: every weight zero (attention output and fc2
    included, so both residual branches add 0), LayerNorm weights and layer scale one."""
    layers = re.compile(r"beit\.layers\.(\d+)\.(.+)")
    weights = {}
    for key, value in fresh.items():
        if (match := layers.fullmatch(key)) and int(match.group(1)) >= depth:
            ones = match.group(2) in IDENTITY_ONES
            weights[key] = torch.ones_like(value) if ones else torch.zeros_like(value)
    return weights


def head_weights(head: UperNetHead) -> dict[str, torch.Tensor]:
    """Our head's state under BeitForSemanticSegmentation's names, floating tensors in float32."""
    weights = {head_key(key): value.detach() for key, value in head.state_dict().items()}
    floating = _float32({key: value for key, value in weights.items() if value.is_floating_point()})
    return weights | floating


def head_key(ours: str) -> str:
    """`ppm.1.1.0.weight` -> `decode_head.psp_modules.blocks.1.conv.convolution.weight`, by HEAD_MODULES."""
    for pattern, theirs, conv_norm_act in HEAD_MODULES:
        if match := re.fullmatch(rf"{pattern}\.(.+)", ours):
            inner = match.group(match.re.groups)
            if conv_norm_act:
                index, name = inner.split(".", 1)
                inner = f"{CONV_NORM_ACT[index]}.{name}"
            return f"{match.expand(theirs)}.{inner}"
    raise CheckpointError(f"the segmentation head's {ours} has no counterpart in {ARCHITECTURE}")


def our_logits(model: VLTransformer, head: UperNetHead, images: torch.Tensor) -> torch.Tensor:
    """The head's 'decode' logits over the raw outputs of its blocks, as the segmentation task computes
    them: (B, classes, 4h, 4w)."""
    found: dict[int, torch.Tensor] = {}
    hooks = [
        model.blocks[block].register_forward_hook(lambda _m, _a, out, block=block: found.__setitem__(block, out))
        for block in set(head.blocks)
    ]
    try:
        model(images=images)
    finally:
        for hook in hooks:
            hook.remove()
    side = model.config.image_size // model.config.patch_size
    # (B, 1 + h*w, D) -> drop the cls token -> (B, D, h, w)
    return head([found[b][:, 1:].transpose(1, 2).reshape(len(images), -1, side, side) for b in head.blocks])["decode"]


def max_logit_difference(
    model: VLTransformer, head: UperNetHead, exported: "PreTrainedModel", seed: int = 0
) -> tuple[float, float]:
    """max |ours - theirs| of the logits on VERIFY_IMAGES random images (N(0, 1) pixels), and max |ours|."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(VERIFY_IMAGES, config.channels, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        ours, theirs = our_logits(model, head, images), exported(pixel_values=images).logits
    return float((ours - theirs).abs().max()), float(ours.abs().max())


def readme(version: str, source: tuple[Path, str, dict | None], config: ModelConfig, plan: SegmentationPlan) -> str:
    grid = config.image_size // config.patch_size
    identity = (
        f" Layer {config.depth} is an exact identity (zero output weights), added because out indices stop at "
        "the layer count: `last_hidden_state` is still ours."
        if max(plan.out_indices) > config.depth
        else ""
    )
    return (
        f"# vlmerge segmentation model ({ARCHITECTURE})\n\n{_exported_from(version, source, config)}"
        f"Load with `transformers.{ARCHITECTURE}.from_pretrained(folder)`. `logits` are vlmerge's UperNet head's "
        f"'decode' logits: {plan.classes} classes on a {4 * grid}x{4 * grid} grid (4x the patch grid); "
        "upsample them to the image (bilinear), as the segmentation task does.\n\n"
        f"{_pixels(config)}"
        f"- Backbone: blocks {plan.blocks} (0-based) feed the head, `out_indices` {list(plan.out_indices)} "
        f"(BEiT reads out index i from `hidden_states[i - 1]`, and `hidden_states[0]` is the embeddings).{identity}\n"
        f"- Head: UperNet (pool scales {plan.pool_scales}, {plan.channels} channels) and the auxiliary FCN on the "
        f"third level (loss weight {AUX_WEIGHT}, ignore index {IGNORE_LABEL}), with their BatchNorm running statistics.\n"
        "- Class names are not in the checkpoint: `id2label` is transformers' default (LABEL_0, ...).\n"
        "- Not exported: the text path, vlmerge's pooler.\n"
    )
