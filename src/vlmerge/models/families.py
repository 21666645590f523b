"""The model families (`Family`, registered by name in FAMILIES), and a file's config read from its shapes.

A released VLMo, BEiT-3 or paper checkpoint carries no vlmerge config; its layout (io/layout.py)
names the family, and the tensor shapes give the sizes. What shapes cannot tell (BEiT-3's head
count, VLMo's image size) takes the family's published value, and `overrides` set any field.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from vlmerge.core.errors import CheckpointError
from vlmerge.core.keys import block_key, parse_block_path
from vlmerge.core.modality import Modality
from vlmerge.core.registry import Registry
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.io.layout import Layout
from vlmerge.models.config import ExpertPlacement, ModelConfig
from vlmerge.models.positions import image_distances

SizeInference = Callable[[CheckpointReader, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """What a model family is, in one place: the layout its released files use, the options (beyond
    sizes) that make the one model run its weights exactly, how its sizes are read from a released
    file's shapes, and the layouts its weights may be written in (another family's layout names
    modules it does not have)."""

    name: str
    layout: Layout
    options: Mapping[str, Any]
    infer_sizes: SizeInference | None  # None: its files carry their config (vlmerge's own)
    output_layouts: tuple[Layout, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))  # frozen, as the record


FAMILIES: Registry[Family] = Registry("model family")


def layout_family(layout: Layout) -> Family:
    """The family whose released files use `layout`."""
    families = (FAMILIES.get(name) for name in FAMILIES)
    return next(family for family in families if family.layout is layout)


def family_options(name: str) -> dict[str, Any]:
    """The options of family `name`, as config fields (a copy: the record's own are read-only)."""
    return dict(FAMILIES.get(name).options)


BEIT3_HEAD_WIDTH = 64  # every BEiT-3 size has 64-wide heads (base 768/12, large 1024/16)
BEIT3_POSITION_OFFSET = 2  # fairseq's leading unused rows of BEiT-3's position tables
VLMO_IMAGE_SIZE = 224  # VLMo's released checkpoints; the shared table's rows also depend on it


def family_config(family: str, **fields: Any) -> ModelConfig:
    """A config of `family` with the given sizes."""
    return ModelConfig.parse({**family_options(family), **fields}, where=f"{family} model")


def checkpoint_config(reader: CheckpointReader, overrides: Mapping[str, Any] | None = None) -> ModelConfig | None:
    """The config a checkpoint stores, or for a released file of a known family the one its shapes
    give; None for a native file without one."""
    if reader.config is not None:
        return ModelConfig.parse({**reader.config, **(overrides or {})}, where=f"{reader.path} config")
    if reader.layout is Layout.NATIVE:
        return None
    if reader.layout is Layout.REFERENCE and "relative_position_bias_table" not in reader:
        return None  # a native model under the paper's names: nothing tells its head count
    family = layout_family(reader.layout)
    try:
        fields = family.infer_sizes(reader, dict(overrides or {}))
    except KeyError as error:
        raise CheckpointError(
            f"{reader.path}: cannot read the model's sizes from its tensors (no tensor {error.args[0]!r})"
        ) from None
    except ValueError as error:
        raise CheckpointError(f"{reader.path}: cannot read the model's sizes from its tensors ({error})") from None
    return family_config(family.name, **{**fields, **(overrides or {})})


def _layers(reader: CheckpointReader) -> dict[int, set[Modality]]:
    """Per layer, the modalities whose experts it holds."""
    layers: dict[int, set[Modality]] = {}
    for key in reader.keys:
        path = parse_block_path(key)
        if path is not None:
            layers.setdefault(path.layer, set())
            if path.modality is not None:
                layers[path.layer].add(path.modality)
    if not layers:
        raise ValueError("no transformer blocks")
    return layers


def _first_vl_layer(layers: dict[int, set[Modality]]) -> int | None:
    return min((layer for layer, experts in layers.items() if Modality.VL in experts), default=None)


def _common(reader: CheckpointReader, width: int, layers: dict[int, set[Modality]]) -> dict[str, Any]:
    """Sizes every family shows the same way: width, depth, FFN ratio, patch size, vocabulary."""
    fc1 = next((key for key in reader.keys if key.endswith("fc1.weight")), None)
    if fc1 is None:
        raise ValueError("no FFN weight (fc1) to read the FFN width from")
    _, channels, _, patch = _shape(reader, "patch_embed.proj.weight", 4)
    return {
        "width": width,
        "depth": len(layers),
        "mlp_ratio": _shape(reader, fc1, 2)[0] / width,
        "patch_size": patch,
        "channels": channels,
        "vocab_size": _shape(reader, "text_embed.word.weight", 2)[0],
    }


def _shape(reader: CheckpointReader, key: str, dims: int) -> tuple[int, ...]:
    """The shape of tensor `key`, which the sizes are read from: one with another number of
    dimensions (a scalar, say) is named here, not met as an IndexError."""
    shape = reader.shape(key)
    if len(shape) != dims:
        stored, batched = reader.mapping.stored[key]
        shown = list(shape[1:] if batched else shape)
        raise ValueError(f"tensor {stored!r} has shape {shown}, expected {dims - batched} dimensions")
    return shape


def _beit3_sizes(reader: CheckpointReader, overrides: dict[str, Any]) -> dict[str, Any]:
    width = _shape(reader, "cls_token", 3)[-1]
    fields = _common(reader, width, _layers(reader))
    patches = _shape(reader, "pos_embed", 3)[1] - 1 - BEIT3_POSITION_OFFSET
    return {
        **fields,
        "heads": width // BEIT3_HEAD_WIDTH,
        "image_size": _grid(patches) * fields["patch_size"],
        "max_text_len": _shape(reader, "text_embed.position.weight", 2)[0] - BEIT3_POSITION_OFFSET,
    }


def _grid(patches: int) -> int:
    """Patches along one side of the square grid an image position table has rows for."""
    grid = math.isqrt(max(patches, 0))
    if grid == 0 or grid * grid != patches:
        raise ValueError(f"the image position table has {patches} patch rows, not a square grid")
    return grid


def _relative_sizes(reader: CheckpointReader, depth: int, patch: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Heads, image size and text span from the shared relative position table (VLMo, the paper);
    without a table (VLMo base+), absolute positions and the head count from `overrides`."""
    if "relative_position_bias_table" not in reader:
        if "heads" not in overrides:
            raise ValueError(
                "without a relative position table the head count is not in the shapes; give heads (--heads)"
            )
        return {
            "position_bias": "none",
            "image_positions": True,
            "text_positions": True,
            "heads": overrides["heads"],
            "image_size": _grid(_shape(reader, "pos_embed", 3)[1] - 1) * patch,
            "max_text_len": _shape(reader, "text_embed.position.weight", 2)[0],
        }
    rows, columns = _shape(reader, "relative_position_bias_table", 2)
    if columns % depth:
        raise ValueError(f"the relative position table's {columns} columns are not heads x {depth} layers")
    image_size = overrides.get("image_size", VLMO_IMAGE_SIZE)
    text_rows = rows - image_distances(image_size // patch) - 2
    if text_rows <= 0 or text_rows % 2:
        raise ValueError(
            f"a relative position table of {rows} rows does not fit {image_size}-pixel images; "
            "give the image size (--image-size)"
        )
    span = text_rows // 2
    table = "text_embed.position.weight"
    return {
        "heads": columns // depth,
        "image_size": image_size,
        "relative_text_span": span,
        "text_position_table": table in reader,  # BERT's, carried unused beside the relative table
        "max_text_len": _shape(reader, table, 2)[0] if table in reader else span,
    }


def _paper_sizes(reader: CheckpointReader, overrides: dict[str, Any]) -> dict[str, Any]:
    """VLMo's sizes, and where the experts sit (the paper's variants differ in it)."""
    slots = {path.slot for key in reader.keys if (path := parse_block_path(key)) and path.modality}
    experts = slots & {"norm1", "attn", "norm2", "mlp"}
    placement = next((p for p in ExpertPlacement if p.slots == experts), None)
    if placement is None:
        raise ValueError(f"experts in {sorted(experts)} are no expert placement the model has")
    return {**_vlmo_like_sizes(reader, overrides), "placement": placement.value}


def _vlmo_like_sizes(reader: CheckpointReader, overrides: dict[str, Any]) -> dict[str, Any]:
    """The sizes of VLMo and of the paper's model (derived from it): the common ones, the relative
    table's, the first vl layer, layer scale and pooler where present."""
    layers = _layers(reader)
    fields = _common(reader, _shape(reader, "cls_token", 3)[-1], layers)
    fusion = _first_vl_layer(layers)
    return {
        **fields,
        **_relative_sizes(reader, fields["depth"], fields["patch_size"], overrides),
        "fusion_layer": fusion if fusion is not None else fields["depth"] - 1,
        "layer_scale": block_key(0, "gamma_1") in reader,
        "pooler": "pooler.dense.weight" in reader,
    }


# The options (beyond sizes) in each record are what make the one model run that family's weights exactly.
for _family in (
    Family("native", Layout.NATIVE, {}, None, (Layout.NATIVE, Layout.REFERENCE)),
    Family(
        "paper",
        Layout.REFERENCE,
        {
            "family": "paper",
            "image_mask_token": True,  # its masked-image-modelling token, carried
            "text_norm_eps": 1e-12,
            "position_bias": "relative",
            "image_positions": False,
            "text_positions": False,
            "text_position_table": True,  # BERT's, carried unused beside the relative table
            "text_type_embedding": True,
        },
        _paper_sizes,
        (Layout.NATIVE, Layout.REFERENCE),
    ),
    Family(
        "vlmo",
        Layout.VLMO,
        {
            "family": "vlmo",
            "text_norm_eps": 1e-12,
            "placement": "ffn",
            "pair_attention": "across",
            "position_bias": "relative",
            "image_positions": False,
            "text_positions": False,
            "text_position_table": True,  # BERT's, carried unused beside the relative table
            "text_type_embedding": True,
        },
        _vlmo_like_sizes,
        (Layout.NATIVE, Layout.VLMO),
    ),
    Family(
        "beit3",
        Layout.BEIT3,
        {
            "family": "beit3",
            "vl_experts": False,
            "pair_attention": "across",
            "qkv": "separate",
            "k_bias": True,
            "sub_ln": True,
            "layer_scale": False,
            "position_offset": BEIT3_POSITION_OFFSET,
            "text_norm": False,
            "token_types": False,
            "final_norm_experts": True,
            "pooler": False,
            "image_mask_token": True,
            "norm_eps": 1e-5,
        },
        _beit3_sizes,
        (Layout.NATIVE, Layout.BEIT3),
    ),
):
    FAMILIES.add(_family.name, _family)

# Each family's options by name, as plain dicts (read from the records), for code that builds configs.
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {name: family_options(name) for name in FAMILIES}
