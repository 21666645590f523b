"""Export a merged (modality-agnostic) model's image tower as a Hugging Face `transformers` model.

The image path of `VLTransformer` (`embed_image`, every block on its single set of weights, the
final norm) becomes, exactly up to float rounding:
- `ViTModel` for absolute image positions: the fused qkv split into q/k/v (k bias zero unless
  the model has one), layer scale folded into the attention output and fc2, since
  γ⊙(Wx + b) = (γ[:, None]W)x + γb; the image token-type row, a constant added to every image
  token, folded into the position embeddings;
- `BeitModel` for a relative position bias (VLMo/the paper): one table per layer (BEiT's
  `use_relative_position_bias`), the image rows of our shared table with that layer's heads'
  columns; layer scale as BEiT's lambda_1/lambda_2; absolute positions, if any, plus the
  token-type row as BEiT's absolute position table. BEiT's key has no bias: a k bias adds q·b_k to every logit of a query,
  the same for every key, which softmax ignores, so it is dropped.
Features are `last_hidden_state`. Our pooler (tanh of a dense layer on the first token) is
ViT's own, so a ViT export carries it: `from_pretrained(folder)` builds a pooler unless told
`add_pooling_layer=False`, and a random one would be worse than ours (whose `pooler_output`
equals `model.pool`; pre-training trains it on the fused image-text output, ITM). BEiT has no
such pooler (its `pooler_output` is the first token of `last_hidden_state`): ours is left out.
Refused, in one error: a multiway model (merge it first; its final norms may be per modality
too), sub-LN inside attention and FFN (BEiT-3), and block weights the export would not carry.
A checkpoint with a segmentation head exports with it as BeitForSemanticSegmentation
(`vlmerge.export.segmentation`), or is refused there.

Weights are written in float32. The module names filled are those of transformers >= 5 (whose
`save_pretrained` writes the classic key names, so the folder also reads in older versions).
This package reads `vlmerge.models` (config, loader), above `io` in the layering, because exporting
is defined by what the model computes.
"""

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmerge import __version__
from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.core.keys import block_key, parse_block_path
from vlmerge.io.atomic import atomic_folder, nearest_directory, remove_stale_temporaries, write_location
from vlmerge.io.checkpoint import CheckpointReader, open_checkpoint
from vlmerge.models.checkpoint import model_from_reader
from vlmerge.models.config import ModelConfig
from vlmerge.models.families import checkpoint_config
from vlmerge.models.positions import image_distances
from vlmerge.models.transformer import IMAGE_TYPE, VLTransformer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MIN_TRANSFORMERS = 5
RELATIVE_TABLE = "relative_position_bias_table"  # [rows, heads * depth], shared by all layers
VERIFY_TOLERANCE = 1e-4  # max |difference| of the features at export, per unit of the largest (at least 1)
VERIFY_IMAGES = 2

# Our block, q/k/v split and layer scale apart, under the names of transformers' ViT/BEiT layer.
LAYER = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.q_proj.weight": "q.weight",
    "attention.q_proj.bias": "q.bias",
    "attention.k_proj.weight": "k.weight",
    "attention.v_proj.weight": "v.weight",
    "attention.v_proj.bias": "v.bias",
    "attention.o_proj.weight": "proj.weight",
    "attention.o_proj.bias": "proj.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "mlp.fc1.weight": "fc1.weight",
    "mlp.fc1.bias": "fc1.bias",
    "mlp.fc2.weight": "fc2.weight",
    "mlp.fc2.bias": "fc2.bias",
}
VIT_LAYER = {**LAYER, "attention.k_proj.bias": "k.bias"}
BEIT_LAYER_SCALE = {"lambda_1": "gamma_1", "lambda_2": "gamma_2"}
BLOCK_NORMS_AND_MLP = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias") + tuple(
    f"mlp.{name}" for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
)


@dataclass(frozen=True)
class HFExport:
    path: Path
    architecture: str  # "ViTModel", "BeitModel" or "BeitForSemanticSegmentation"
    transformers_version: str
    max_abs_difference: float | None  # of the features on random images at export; None: not verified


def export_architecture(config: ModelConfig) -> str:
    """The transformers class that computes this model's image path, or one error naming every
    part of it that no such class can express. Needs only the config: checked before any tensor."""
    problems = []
    if config.is_multiway:
        problems.append(
            f"it is modality-specific (experts: {config.placement.value}); only a merged, modality-agnostic "
            "model exports: merge it first (vlmerge merge)"
        )
    if config.sub_ln:
        problems.append("sub-LN inside attention and FFN (BEiT-3's inner_attn_ln, ffn_layernorm)")
    if problems:
        raise CheckpointError(
            f"cannot export a {config.family} model to transformers' ViTModel/BeitModel: {'; '.join(problems)}"
        )
    return "BeitModel" if config.position_bias == "relative" else "ViTModel"


def image_tower(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> "PreTrainedModel":
    """A transformers model (eval mode) computing what `VLTransformer(config)` with weights
    `state` computes on images: `last_hidden_state` equals our `model(images=...).hidden`."""
    transformers = _transformers()
    architecture = export_architecture(config)
    _check_keys(config, state)
    if architecture == "BeitModel":
        hf_config, weights = transformers.BeitConfig(**_beit_config(config)), _beit_weights(config, state)
        model = transformers.BeitModel(hf_config, add_pooling_layer=False)
    else:
        hf_config, weights = transformers.ViTConfig(**_vit_config(config)), _vit_weights(config, state)
        model = transformers.ViTModel(hf_config, add_pooling_layer=config.pooler)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def export_hf(
    checkpoint: str | os.PathLike, out: str | os.PathLike, verify: bool = True, task_head: bool = True
) -> HFExport:
    """Write the image tower of a merged checkpoint as a transformers model folder `out`
    (config.json, model.safetensors, README.md), atomically; `verify` compares its outputs with
    ours on random images first and refuses a difference above VERIFY_TOLERANCE, or one not finite.
    A checkpoint with a segmentation head exports with it, as BeitForSemanticSegmentation (see
    `vlmerge.export.segmentation`), or is refused; `task_head=False` exports its image tower alone.
    The checkpoint is opened once: the hash in the README is of the file the weights were read from."""
    from vlmerge.export import segmentation  # built on this module's BEiT mapping, so imported here

    out = check_output_folder(out, checkpoint)
    with open_checkpoint(checkpoint) as reader:
        config, architecture = _export_config(reader)
        plan = segmentation.segmentation_plan(reader, config) if task_head else None  # refused before any tensor
        model = model_from_reader(reader, config).eval()  # the opening the README's hash is of
        if plan is None:
            exported = image_tower(config, model.state_dict())
            measured = max_feature_difference(model, exported) if verify else None
            what = "image features"
        else:
            head = segmentation.read_head(reader, config, plan)
            exported = segmentation.segmentation_model(config, model.state_dict(), head, plan)
            measured = segmentation.max_logit_difference(model, head, exported) if verify else None
            architecture, what = segmentation.ARCHITECTURE, "segmentation logits"
        difference = _checked_difference(measured, reader.path, architecture, what) if verify else None
        source = (reader.path, reader.sha256(), reader.metadata_json("merge"))
        reader.check_unchanged()  # rewritten in place while read: neither the weights nor the hash are sure
    version = _transformers().__version__
    if plan is None:
        readme = _readme(architecture, version, source, config, _carries_pooler(exported))
    else:
        readme = segmentation.readme(version, source, config, plan)
    remove_stale_temporaries(out)
    with atomic_folder(out) as folder, _no_progress_bars():
        exported.save_pretrained(folder)
        (folder / "README.md").write_text(readme + _verified(difference, what))
    return HFExport(out, architecture, version, difference)


def _export_config(reader: CheckpointReader) -> tuple[ModelConfig, str]:
    """The checkpoint's model config (stored, or read from a released file's shapes) and the class it exports to."""
    config = checkpoint_config(reader)
    if config is None:
        raise CheckpointError(f"{reader.path}: no model config in the checkpoint metadata; cannot export it")
    try:
        return config, export_architecture(config)
    except CheckpointError as error:
        raise CheckpointError(f"{reader.path}: {error}") from None


def _checked_difference(measured: tuple[float, float], path: Path, architecture: str, what: str) -> float:
    """The outputs' max |difference| (with max |ours|, as `max_feature_difference` measures them), or one
    error where it is above tolerance or not finite (NaN compares false with everything, so a plain `>`
    would pass it)."""
    difference, scale = measured
    if not (math.isfinite(difference) and math.isfinite(scale)):
        raise CheckpointError(
            f"{path}: the {what} are not finite on random images (ours up to {scale:.3g}, max |difference| "
            f"from the exported {architecture} {difference:.3g}): weights near float32's limit? not written"
        )
    if difference > VERIFY_TOLERANCE * max(scale, 1.0):
        raise CheckpointError(
            f"{path}: the exported {architecture} differs from our {what} by {difference:.3g} "
            f"(ours up to {scale:.3g}; tolerance {VERIFY_TOLERANCE:g} of that); not written"
        )
    return difference


def max_feature_difference(model: VLTransformer, tower: "PreTrainedModel", seed: int = 0) -> tuple[float, float]:
    """max |ours - theirs| of the features (and of the pooled output where the tower carries our
    pooler) of VERIFY_IMAGES random images (N(0, 1) pixels), and max |ours|: float32 rounding
    grows with the features' size."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(VERIFY_IMAGES, config.channels, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        ours, theirs = model(images=images), tower(pixel_values=images)
        difference = (ours.hidden - theirs.last_hidden_state).abs().max()
        if _carries_pooler(tower):
            difference = difference.maximum((model.pool(ours) - theirs.pooler_output).abs().max())
    return float(difference), float(ours.hidden.abs().max())


def _carries_pooler(tower: "PreTrainedModel") -> bool:
    return getattr(tower, "pooler", None) is not None  # ViT's, ours; BEiT's towers are built without


def check_output_folder(out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an output folder that exists with content (or is a file, such as
    the input) or whose nearest existing parent is not a writable directory."""
    text = os.fspath(out)
    if not text:
        raise ConfigError("the output folder is empty; give a folder name")
    folder = Path(text)
    if folder.name in ("", ".."):
        raise ConfigError(f"{folder}: give the output folder a name of its own")
    location = write_location(folder)
    if location.exists() and not (location.is_dir() and not any(location.iterdir())):
        what = "is the input checkpoint" if source is not None and _same_path(location, Path(source)) else "exists"
        raise ConfigError(f"{folder}: {what}; give a new (or empty) folder")
    parent = nearest_directory(location.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: {parent} is not a writable directory")
    return folder


def _check_keys(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> None:
    """Every tensor the image path reads is there, and no block tensor is left that it would drop."""
    needed = set(_embedding_keys(config)) | {key for layer in range(config.depth) for key in _block_keys(config, layer)}
    missing = sorted(needed - set(state))
    left = sorted(key for key in state if parse_block_path(key) is not None and key not in needed)
    experts = [key for key in left if parse_block_path(key).modality is not None]
    if experts:
        raise CheckpointError(f"modality experts left in the weights ({experts[0]}, ...): merge the model first")
    if missing or left:
        raise CheckpointError(
            f"the weights do not fit the {config.family} config: missing {missing[:3]}, not exportable {left[:3]}"
        )


def _embedding_keys(config: ModelConfig) -> list[str]:
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "norm.weight", "norm.bias"]
    keys += ["pos_embed"] if config.image_positions else []
    keys += ["token_type_embed.weight"] if config.token_types else []
    keys += ["pooler.dense.weight", "pooler.dense.bias"] if config.pooler else []
    return keys + ([RELATIVE_TABLE] if config.position_bias == "relative" else [])


def _block_keys(config: ModelConfig, layer: int) -> list[str]:
    if config.qkv == "separate":
        attention = ["q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "v_proj.bias"]
        attention += ["k_proj.bias"] if config.k_bias else []
    else:
        attention = ["qkv.weight", "q_bias", "v_bias"] + (["k_bias"] if config.k_bias else [])
    inner = [f"attn.{name}" for name in [*attention, "proj.weight", "proj.bias"]] + list(BLOCK_NORMS_AND_MLP)
    inner += ["gamma_1", "gamma_2"] if config.layer_scale else []
    return [block_key(layer, name) for name in inner]


def _block(config: ModelConfig, state: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """One block in float64 under plain names: q/k/v split (k bias zero where absent), and
    gamma_1/gamma_2 (ones without layer scale)."""

    def get(name: str) -> torch.Tensor:
        return state[block_key(layer, name)].detach().to(torch.float64)

    width = config.width
    tensors = {name.removeprefix("mlp."): get(name) for name in BLOCK_NORMS_AND_MLP}
    tensors |= {"proj.weight": get("attn.proj.weight"), "proj.bias": get("attn.proj.bias")}
    no_bias = torch.zeros(width, dtype=torch.float64)
    if config.qkv == "separate":
        for part in "qkv":
            tensors[f"{part}.weight"] = get(f"attn.{part}_proj.weight")
            tensors[f"{part}.bias"] = get(f"attn.{part}_proj.bias") if part != "k" or config.k_bias else no_bias
    else:
        q, k, v = get("attn.qkv.weight").split(width)  # (3D, D): q, k, v rows in that order
        tensors |= {"q.weight": q, "k.weight": k, "v.weight": v, "q.bias": get("attn.q_bias")}
        tensors |= {"k.bias": get("attn.k_bias") if config.k_bias else no_bias, "v.bias": get("attn.v_bias")}
    for name in ("gamma_1", "gamma_2"):
        tensors[name] = get(name) if config.layer_scale else torch.ones(width, dtype=torch.float64)
    return tensors


def _image_constant(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """What `embed_image` adds to every token: absolute positions and the image token type, (1, N+1, D)."""
    total = torch.zeros(1, config.num_patches + 1, config.width, dtype=torch.float64)
    if config.image_positions:  # after the table's unused leading rows, as embed_image reads it
        total = total + state["pos_embed"][:, config.position_offset :].detach().to(torch.float64)
    if config.token_types:
        total = total + state["token_type_embed.weight"][IMAGE_TYPE].detach().to(torch.float64)
    return total


def _embeddings(config: ModelConfig, state: Mapping[str, torch.Tensor], positions: bool) -> dict[str, torch.Tensor]:
    weights = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if positions:
        weights["embeddings.position_embeddings"] = _image_constant(config, state)
    return weights


def _vit_weights(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = _embeddings(config, state, positions=True)
    if config.pooler:
        weights |= {f"pooler.dense.{name}": state[f"pooler.dense.{name}"] for name in ("weight", "bias")}
    for layer in range(config.depth):
        block = _block(config, state, layer)
        for gamma, linear in (("gamma_1", "proj"), ("gamma_2", "fc2")):  # γ⊙(Wx + b) = (γ[:, None]W)x + γb
            block[f"{linear}.weight"] = block[gamma][:, None] * block[f"{linear}.weight"]
            block[f"{linear}.bias"] = block[gamma] * block[f"{linear}.bias"]
        weights |= {f"layers.{layer}.{theirs}": block[ours] for theirs, ours in VIT_LAYER.items()}
    return _float32(weights)


def _beit_weights(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = _embeddings(config, state, positions=_beit_positions(config))
    table, rows, heads = state[RELATIVE_TABLE], image_distances(config.window), config.heads
    if table.shape[0] < rows or table.shape[1] != heads * config.depth:
        raise CheckpointError(
            f"{RELATIVE_TABLE} has shape {tuple(table.shape)}; expected at least {rows} rows (the image "
            f"distances of a {config.window}x{config.window} grid) and heads x depth = {heads * config.depth} columns"
        )
    layer_names = LAYER | (BEIT_LAYER_SCALE if config.layer_scale else {})
    for layer in range(config.depth):
        block = _block(config, state, layer)  # k bias dropped: constant over the keys, softmax ignores it
        weights |= {f"layers.{layer}.{theirs}": block[ours] for theirs, ours in layer_names.items()}
        weights[f"layers.{layer}.relative_position_bias.{RELATIVE_TABLE}"] = table[
            :rows, layer * heads : (layer + 1) * heads
        ]
    return _float32(weights)


def _common_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "intermediate_size": int(config.width * config.mlp_ratio),
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
        "layer_norm_eps": config.norm_eps,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.channels,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def _vit_config(config: ModelConfig) -> dict[str, Any]:
    return _common_config(config) | {"qkv_bias": True}


def _beit_positions(config: ModelConfig) -> bool:
    """An absolute table only where our image tokens get a constant: positions or a token type."""
    return config.image_positions or config.token_types


def _beit_config(config: ModelConfig) -> dict[str, Any]:
    return _common_config(config) | {
        "use_mask_token": False,
        "use_absolute_position_embeddings": _beit_positions(config),
        "use_relative_position_bias": True,
        "use_shared_relative_position_bias": False,
        "layer_scale_init_value": _beit_layer_scale_init(config),
        "use_mean_pooling": False,  # the final LayerNorm kept (mean pooling would replace it)
        "drop_path_rate": 0.0,
    }


def _beit_layer_scale_init(config: ModelConfig) -> float:
    """Above 0, BEiT makes lambda_1/lambda_2 parameters (the values loaded are ours); 0 leaves them out."""
    if not config.layer_scale:
        return 0.0
    return config.layer_scale_init if config.layer_scale_init > 0 else 1.0


def _float32(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights in float32, refused where a value is not finite there: folding layer scale into a
    weight near float32's limit overflows, and the export would compute infinities without a word."""
    converted = {key: value.detach().to(torch.float32).contiguous() for key, value in weights.items()}
    for key, value in converted.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"the exported weight {key} is not finite in float32; the weights are too large")
    return converted


def _readme(
    architecture: str, version: str, source: tuple[Path, str, dict | None], config: ModelConfig, pooled: bool
) -> str:
    folded = ["layer scale into the attention output and fc2 dense layers"] if architecture == "ViTModel" else []
    if config.token_types:
        folded.append("the image token-type embedding into the position embeddings")
    if pooled:
        pooler = "`pooler_output` is vlmerge's `model.pool` (pre-training trains it on the fused image-text output)"
    elif architecture == "ViTModel":
        pooler = "the model has no pooler: load with `add_pooling_layer=False`, or transformers adds a random one"
    else:
        pooler = "vlmerge's pooler is not exported (BEiT's `pooler_output` is the first token)"
    return (
        f"# vlmerge image tower ({architecture})\n\n{_exported_from(version, source, config)}"
        f"Load with `transformers.{architecture}.from_pretrained(folder)`. `last_hidden_state` (after the final "
        f"LayerNorm) is vlmerge's `model(images=...).hidden`; {pooler}.\n\n"
        f"{_pixels(config)}"
        f"- Folded: {'; '.join(folded) or 'nothing'}.\n"
        "- Not exported: the text path, task heads.\n"
    )


def _exported_from(version: str, source: tuple[Path, str, dict | None], config: ModelConfig) -> str:
    """The README's provenance: vlmerge and transformers versions, the file and its hash, the merge."""
    path, sha256, merge = source
    merge_line = f"Merge: `{json.dumps(merge, sort_keys=True)}`.\n\n" if merge else ""
    return (
        f"Exported by vlmerge {__version__} (`vlmerge export-hf`) with transformers {version} from "
        f"`{path.name}` (sha256 `{sha256}`), a modality-agnostic {config.family} checkpoint "
        f"({config.width} wide, {config.depth} layers, {config.heads} heads).\n\n{merge_line}"
    )


def _pixels(config: ModelConfig) -> str:
    return (
        f"- Pixels: {config.image_size}x{config.image_size} RGB, [0, 255] mapped to [-1, 1] "
        "(rescale 1/255, then mean 0.5, std 0.5), as vlmerge's `model_images`.\n"
    )


def _verified(difference: float | None, what: str = "image features") -> str:
    if difference is None:
        return ""
    return f"- Checked at export: max |difference| from vlmerge's {what} on {VERIFY_IMAGES} random images {difference:.2g}.\n"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _transformers():
    """The optional `transformers` package, at a version whose module names the export fills."""
    try:
        import transformers
    except ImportError as error:
        raise ConfigError(f"export-hf needs transformers>={MIN_TRANSFORMERS}: pip install 'transformers>=5'") from error
    if int(transformers.__version__.split(".")[0]) < MIN_TRANSFORMERS:
        raise ConfigError(
            f"export-hf needs transformers>={MIN_TRANSFORMERS} (found {transformers.__version__}): "
            "pip install -U 'transformers>=5'"
        )
    return transformers


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False
