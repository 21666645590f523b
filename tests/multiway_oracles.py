"""Test oracles: forward passes of VLMo and of the multiway model of Sung et al. 2023.

Neither model has an installable package, so ``vlmerge``'s import of their checkpoints is
checked against this independent re-implementation, written as plain functions on a state
dict from a reading of the public code (read, not copied; no timm, Lightning or transformers).
It reproduces what the code computes, quirks included, and is written for clarity, not speed.

Sources read:

* VLMo: ``microsoft/unilm`` commit 768a3c87 (``vlmo/`` last changed in 8b810f5f),
  ``vlmo/vlmo/modules/multiway_transformer.py`` (``Attention.forward`` l. 88-118,
  ``Block`` l. 121-201, ``MultiWayTransformer.visual_embed`` l. 361-375, the variants
  l. 380-406) and ``vlmo/vlmo/modules/vlmo_module.py`` (text embeddings l. 121-133,
  ``get_rel_pos_bias`` l. 340-348, ``build_relative_position_embed`` l. 350-410, ``infer``
  l. 412-471, ``infer_text`` l. 473-527, ``infer_image`` l. 622-685); its pinned
  ``transformers==4.8.1`` for ``BertEmbeddings`` (``modeling_bert.py`` l. 167-224).
* The paper's model: ``ylsung/vl-merging`` commit 13c30417 (model files unchanged since
  11ecc617, the commit ``paper_oracle.py`` read), ``src/vilt/modules/vision_transformer.py``
  (``Attention`` l. 299-363, ``Block`` l. 366-691, ``visual_embed`` l. 952-991,
  ``VisionTransformer.__init__`` l. 776-895) and ``src/vilt/modules/vilt_module.py`` (text
  embeddings l. 51-67, relative position buffers l. 123-261, ``get_rel_pos_bias``
  l. 1061-1064, ``infer`` l. 1071-1156, ``infer_text`` l. 1159-1223, ``infer_image``
  l. 1287-1375); its configs in ``src/vilt/config.py`` and ``src/run.py`` l. 165-185.

What the reading found:

* Both models build the relative position index the same way (vlmo_module.py l. 358-410 and
  vilt_module.py l. 123-186): one table ``[R + 2 * max_text_len_of_initckpt + 2,
  heads * depth]`` with ``R = (2W - 1)^2 + 3`` for a ``W x W`` patch grid.  Image patch pairs
  index ``(h_q - h_k + W - 1) * (2W - 1) + (w_q - w_k + W - 1)`` (query minus key); the image
  cls row, column and corner use ``R - 3``, ``R - 2``, ``R - 1``.  Text token pairs index
  ``R + 2 + (k - q) + M - 2`` (key minus query: the opposite sign), with the text cls row,
  column and corner on the table's last three rows; text-to-image entries are ``R``,
  image-to-text ``R + 1``.  Layer ``i`` reads table columns ``[i * heads, (i + 1) * heads)``.
* VLMo (multiway_transformer.py l. 184-201): attention and norm1 shared; FFN experts
  ``mlp_text``/``mlp_imag`` with ``norm2_text``/``norm2_imag`` in every layer, ``mlp_vl`` and
  ``norm2_vl`` from ``vlffn_start_layer_index`` on.  Text-only input uses the text FFN in
  every layer, image-only the image FFN; a pair attends over the whole sequence in every
  layer, splits the FFN at ``max_text_len`` below the vl layer and uses the vl FFN from it on.
  Base+ (l. 400-406) has no layer scale (``gamma = 1.0``, no keys), no relative position
  bias (no table) and absolute positions instead: ``transformer.pos_embed`` and BERT's
  position embeddings (``VlmoShapes.relative_position=False``).
* The paper's main model is the ``all_moe`` named config (config.py l. 703-711, with
  ``separate_inference = True`` from l. 133): ``use_moe``, ``in_attn``, ``in_ffn``,
  ``use_custom_ln_attn``, ``use_custom_ln_ffn`` and ``self_attn_for_single_mode`` all on.
  Its experts are ``nn.ModuleDict`` entries keyed by modality (vision_transformer.py
  l. 415-431, 449-459, 471-479), so the keys are ``transformer.blocks.{i}.attn.{m}.qkv.weight``,
  ``attn.{m}.q_bias``, ``attn.{m}.v_bias``, ``attn.{m}.proj.{weight,bias}``,
  ``norm1.{m}.{weight,bias}``, ``mlp.{m}.fc{1,2}.{weight,bias}``, ``norm2.{m}.{weight,bias}``
  with ``m`` in ``v, l`` below the fusion layer (``vlffn_start_layer_index``) and
  ``v, l, vl`` from it on (``moe/config.py``).  ``gamma_1``/``gamma_2`` are always there,
  shared (l. 489-491).  Routing (``moe_forward`` l. 607-681, ``apply_ln`` l. 495-523):
  image input (``type_id=0``) uses ``v`` everywhere, text (``type_id=1``) ``l`` everywhere; a
  pair (``type_id=2``) below the fusion layer runs text tokens through ``l`` and image tokens
  through ``v`` **with attention within each modality only** (``self_attn_for_single_mode``,
  l. 619-637: the bias and the mask are sliced to the text and image blocks), and from the
  fusion layer on runs the whole sequence through ``vl`` with full attention.
* The paper's modality-agnostic model (named config ``ufo``, config.py l. 665-667, what a merged
  checkpoint is fine-tuned as) has the same keys without the ``.{m}`` level and the same
  routing (``separate_plain_forward`` l. 560-605): ``PaperShapes(multiway=False)``.
* Both use q and v biases only (k bias zero), attention logits and softmax in float32, LayerNorm
  eps 1e-6 in the encoder and 1e-12 in ``BertEmbeddings``, exact GELU, image token type 1,
  text token type 0, text first in a pair, final ``transformer.norm``.  Neither model adds text
  position embeddings with relative positions (``position_embedding_type="rel_pos"`` makes
  ``BertEmbeddings`` skip them), though the weights are in the state dict.

Changes from the original that do not alter results:

* State dict in, tensors out: no modules, no checkpoint loading; the index matrices are
  computed in closed form from the shapes rather than with ``meshgrid``, and gathered with
  ``table[index]`` instead of ``F.embedding`` (the same gather).
* Dropout and drop path are left out (the outputs are eval-mode); so are the heads and the
  pooler (the outputs are the hidden states after ``transformer.norm``).
* An all-ones image mask is not applied (``masked_fill`` with an all-true mask is a no-op).
* The paper's pair below the fusion layer is computed as the text half and the image half
  through their own experts, one after the other, instead of split-and-concatenate inside one
  block: the same per-token operations and the same attention blocks.
* Both models split a pair at ``max_text_len`` and VLMo adds a bias sized for it, so text must
  be padded to ``max_text_len`` (their data modules pad to it); other lengths are refused with
  ``ValueError`` instead of giving a wrong split or a shape error.  The paper's text-only path
  accepts shorter text when ``max_vl_text_len`` is set (vilt_module.py l. 1177-1180).
* Quirk kept: the vl path of a single modality starts from the hidden state of layer
  ``vlffn_start_layer_index - 1``, so with index 0 Python's ``[-1]`` takes the last layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "VlmoShapes",
    "PaperShapes",
    "VLMO_BASE",
    "VLMO_LARGE",
    "VLMO_BASE_PLUS",
    "PAPER_BASE",
    "relative_table_rows",
    "image_relative_position_index",
    "text_relative_position_index",
    "text_image_relative_position_index",
    "vlmo_state_spec",
    "random_vlmo_state",
    "vlmo_image",
    "vlmo_text",
    "vlmo_pair",
    "vlmo_image_through_vl",
    "vlmo_text_through_vl",
    "paper_state_spec",
    "random_paper_state",
    "paper_image",
    "paper_text",
    "paper_pair",
    "paper_image_through_vl",
    "paper_text_through_vl",
]

Tensor = torch.Tensor
State = Mapping[str, Tensor]
_BERT_LN_EPS = 1e-12  # BertConfig.layer_norm_eps default (transformers 4.8.1)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """What both models derive from the image and text sizes."""

    width: int
    depth: int
    heads: int
    mlp_ratio: float
    image_size: int
    patch_size: int
    vocab_size: int
    max_text_len: int
    max_text_len_of_initckpt: int

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 1 <= self.max_text_len <= self.max_text_len_of_initckpt + 3:
            # beyond M + 3 the text indices run past the table (an IndexError in the source)
            raise ValueError(f"max_text_len {self.max_text_len} must be in [1, max_text_len_of_initckpt + 3]")

    @property
    def window(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_len(self) -> int:
        """Image tokens: patches plus cls."""
        return self.window**2 + 1

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def table_rows(self) -> int:
        return relative_table_rows(self.window, self.max_text_len_of_initckpt)


@dataclass(frozen=True)
class VlmoShapes(_Geometry):
    """A VLMo backbone: ``MultiWayTransformer`` plus ``VLMo``'s embeddings and table.

    ``relative_position=False`` is base+: absolute positions, no relative table.
    """

    vlffn_start_layer_index: int
    layer_scale: bool
    norm_eps: float = 1e-6
    relative_position: bool = True
    channels: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.vlffn_start_layer_index <= self.depth:
            raise ValueError(f"vlffn_start_layer_index {self.vlffn_start_layer_index} not in [0, {self.depth}]")


@dataclass(frozen=True)
class PaperShapes(_Geometry):
    """The paper's ``ViLTransformerSS``: ``all_moe`` (``multiway``) or ``ufo`` (agnostic).

    ``fusion_layer`` is its ``vlffn_start_layer_index``; ``max_vl_text_len`` and
    ``num_frames`` (default 1, as in its config) only add buffers, except that
    ``max_vl_text_len`` lets text-only input be shorter than ``max_text_len``.
    """

    fusion_layer: int
    multiway: bool = True
    max_vl_text_len: int | None = None
    num_frames: int = 1
    norm_eps: float = 1e-6
    channels: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.fusion_layer <= self.depth:
            raise ValueError(f"fusion_layer {self.fusion_layer} not in [0, {self.depth}]")
        if self.max_vl_text_len is not None and not 1 <= self.max_vl_text_len <= self.max_text_len:
            raise ValueError(f"max_vl_text_len {self.max_vl_text_len} not in [1, max_text_len]")

    def experts(self, layer: int) -> tuple[str, ...]:
        """Experts of a block (``moe/config.py``); ``("",)`` for the agnostic model."""
        if not self.multiway:
            return ("",)
        return ("v", "l", "vl") if layer >= self.fusion_layer else ("v", "l")


_VLMO_COMMON = dict(
    mlp_ratio=4.0, image_size=224, patch_size=16, vocab_size=30522, max_text_len=40, max_text_len_of_initckpt=196
)
VLMO_BASE = VlmoShapes(width=768, depth=12, heads=12, vlffn_start_layer_index=10, layer_scale=True, **_VLMO_COMMON)
VLMO_LARGE = VlmoShapes(width=1024, depth=24, heads=16, vlffn_start_layer_index=21, layer_scale=True, **_VLMO_COMMON)
VLMO_BASE_PLUS = VlmoShapes(
    width=544,
    depth=24,
    heads=16,
    vlffn_start_layer_index=21,
    layer_scale=False,
    relative_position=False,
    **_VLMO_COMMON,
)
PAPER_BASE = PaperShapes(width=768, depth=12, heads=12, fusion_layer=10, max_vl_text_len=40, **_VLMO_COMMON)


# ---------------------------------------------------------------------------
# Relative position index (identical in both code bases)
# ---------------------------------------------------------------------------


def relative_table_rows(window: int, max_text_len_of_initckpt: int) -> int:
    """``all_num_relative_distance``, the rows of the shared table.

    Laid out as ``[(2W-1)^2 patch distances | image cls x3 | text->image | image->text |
    2M text rows]``, the last three of the text rows being the text cls rows.
    """
    return (2 * window - 1) ** 2 + 3 + 2 * max_text_len_of_initckpt + 2


def _image_distances(window: int) -> int:
    """``num_relative_distance``: patch distances plus the three image cls rows."""
    return (2 * window - 1) ** 2 + 3


def image_relative_position_index(window: int) -> Tensor:
    """``relative_position_index`` [W*W + 1, W*W + 1], int64; query rows, key columns."""
    rows = _image_distances(window)
    patch = torch.arange(window * window)
    h, w = patch // window, patch % window
    dh = h[:, None] - h[None, :] + window - 1  # query minus key
    dw = w[:, None] - w[None, :] + window - 1
    index = torch.empty(window * window + 1, window * window + 1, dtype=torch.int64)
    index[1:, 1:] = dh * (2 * window - 1) + dw
    index[0, :] = rows - 3  # cls query -> any key
    index[:, 0] = rows - 2  # any query -> cls key
    index[0, 0] = rows - 1
    return index


def text_relative_position_index(window: int, text_len: int, max_text_len_of_initckpt: int) -> Tensor:
    """``text_relative_position_index`` [T, T], int64: key minus query, offset past the image rows."""
    image_rows = _image_distances(window)
    all_rows = relative_table_rows(window, max_text_len_of_initckpt)
    pos = torch.arange(text_len - 1)
    index = torch.empty(text_len, text_len, dtype=torch.int64)
    index[1:, 1:] = pos[None, :] - pos[:, None] + (max_text_len_of_initckpt - 2) + image_rows + 2
    index[0, :] = all_rows - 3
    index[:, 0] = all_rows - 2
    index[0, 0] = all_rows - 1
    return index


def text_image_relative_position_index(window: int, text_len: int, max_text_len_of_initckpt: int) -> Tensor:
    """``text_imag_relative_position_index`` [T + P + 1]^2 for text-then-image, float32.

    Float because the source concatenates the int64 blocks with ``torch.ones(...) * R``.
    """
    image_rows = _image_distances(window)
    image_len = window * window + 1
    out = torch.empty(text_len + image_len, text_len + image_len, dtype=torch.float32)
    out[:text_len, :text_len] = text_relative_position_index(window, text_len, max_text_len_of_initckpt)
    out[:text_len, text_len:] = image_rows  # text query -> image key
    out[text_len:, :text_len] = image_rows + 1  # image query -> text key
    out[text_len:, text_len:] = image_relative_position_index(window)
    return out


def _layer_biases(table: Tensor, index: Tensor, heads: int) -> Callable[[int], Tensor]:
    """Layer ``i``'s bias [heads, N, N]: table columns ``[i * heads, (i + 1) * heads)``."""
    gathered = table[index.long()].permute(2, 0, 1)  # [heads * depth, N, N]
    return lambda i: gathered[i * heads : (i + 1) * heads]


# ---------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------

# A spec entry: (shape, kind).  Kinds say how random_*_state fills the tensor.
Spec = dict[str, tuple[tuple[int, ...], str]]


def _layer_norm_spec(spec: Spec, prefix: str, width: int) -> None:
    spec[f"{prefix}.weight"] = ((width,), "norm_weight")
    spec[f"{prefix}.bias"] = ((width,), "bias")


def _linear_spec(spec: Spec, prefix: str, fan_in: int, fan_out: int) -> None:
    spec[f"{prefix}.weight"] = ((fan_out, fan_in), "weight")
    spec[f"{prefix}.bias"] = ((fan_out,), "bias")


def _attention_spec(spec: Spec, prefix: str, width: int) -> None:
    """Own parameters first, as ``state_dict`` lists them."""
    spec[f"{prefix}.q_bias"] = ((width,), "bias")
    spec[f"{prefix}.v_bias"] = ((width,), "bias")
    spec[f"{prefix}.qkv.weight"] = ((3 * width, width), "weight")
    _linear_spec(spec, f"{prefix}.proj", width, width)


def _mlp_spec(spec: Spec, prefix: str, width: int, hidden: int) -> None:
    _linear_spec(spec, f"{prefix}.fc1", width, hidden)
    _linear_spec(spec, f"{prefix}.fc2", hidden, width)


def _text_embeddings_spec(spec: Spec, g: _Geometry) -> None:
    """HF ``BertEmbeddings``: ``position_ids`` is a persistent buffer before 4.31 (and in 4.8.1)."""
    spec["text_embeddings.position_ids"] = ((1, g.max_text_len), "position_ids")
    spec["text_embeddings.word_embeddings.weight"] = ((g.vocab_size, g.width), "embedding")
    spec["text_embeddings.position_embeddings.weight"] = ((g.max_text_len, g.width), "embedding")
    spec["text_embeddings.token_type_embeddings.weight"] = ((2, g.width), "embedding")
    _layer_norm_spec(spec, "text_embeddings.LayerNorm", g.width)


def _patch_embed_spec(spec: Spec, g: VlmoShapes | PaperShapes) -> None:
    spec["transformer.patch_embed.proj.weight"] = ((g.width, g.channels, g.patch_size, g.patch_size), "weight")
    spec["transformer.patch_embed.proj.bias"] = ((g.width,), "bias")


def vlmo_state_spec(shapes: VlmoShapes, *, with_index_buffers: bool = False) -> Spec:
    """Names, shapes and kinds of a VLMo ``state_dict``'s backbone keys, in its order.

    Left out, as not backbone: ``mlm_score.*``, ``itm_score.*``, ``itc_text_proj.*``,
    ``itc_image_proj.*``, ``itc_vl_text_proj.*``, ``itc_vl_image_proj.*``, ``logit_scale``,
    ``logit_vl_scale``, ``vqa_classifier.*``, ``nlvr2_classifier.*`` (NLVR2 also grows
    ``token_type_embeddings`` to 3 rows).  The index matrices are plain attributes at the
    commit read, so not in ``state_dict``; ``vlmo_module.py`` l. 262-264 and 281-283 pop them
    from the files it loads, so released files seem to carry them: ``with_index_buffers``
    adds them (int64, int64, float32).
    """
    s, spec = shapes, {}
    if s.relative_position:
        spec["relative_position_bias_table"] = ((s.table_rows, s.heads * s.depth), "table")
    spec["transformer.cls_token"] = ((1, 1, s.width), "embedding")
    if not s.relative_position:
        spec["transformer.pos_embed"] = ((1, s.image_len, s.width), "position")
    _patch_embed_spec(spec, s)
    for i in range(s.depth):
        b = f"transformer.blocks.{i}"
        if s.layer_scale:
            spec[f"{b}.gamma_1"] = ((s.width,), "gamma")
            spec[f"{b}.gamma_2"] = ((s.width,), "gamma")
        _layer_norm_spec(spec, f"{b}.norm1", s.width)
        _attention_spec(spec, f"{b}.attn", s.width)
        _layer_norm_spec(spec, f"{b}.norm2_text", s.width)
        _layer_norm_spec(spec, f"{b}.norm2_imag", s.width)
        _mlp_spec(spec, f"{b}.mlp_text", s.width, s.mlp_hidden)
        _mlp_spec(spec, f"{b}.mlp_imag", s.width, s.mlp_hidden)
        if i >= s.vlffn_start_layer_index:
            _mlp_spec(spec, f"{b}.mlp_vl", s.width, s.mlp_hidden)
            _layer_norm_spec(spec, f"{b}.norm2_vl", s.width)
    _layer_norm_spec(spec, "transformer.norm", s.width)
    _text_embeddings_spec(spec, s)
    spec["token_type_embeddings.weight"] = ((2, s.width), "token_type")
    _linear_spec(spec, "pooler.dense", s.width, s.width)
    if with_index_buffers and s.relative_position:
        spec["relative_position_index"] = ((s.image_len, s.image_len), "index")
        spec["text_relative_position_index"] = ((s.max_text_len, s.max_text_len), "index")
        n = s.max_text_len + s.image_len
        spec["text_imag_relative_position_index"] = ((n, n), "index")
    return spec


def paper_state_spec(shapes: PaperShapes) -> Spec:
    """Names, shapes and kinds of the paper's ``ViLTransformerSS.state_dict`` backbone keys, in order.

    Left out, as not backbone: ``mlm_score.*``, ``itm_score.*``, ``ifm_text_proj.*``,
    ``ifm_image_proj.*``, ``ifm_vl_text_proj.*``, ``ifm_vl_image_proj.*``, ``logit_scale``,
    ``logit_vl_scale``, ``mim_score.*``, ``d_vae.*``, ``vqa_classifier.*``,
    ``nlvr2_classifier.*``, ``img_cls_classifier.*``.  Kept although unused by the forward
    passes: ``transformer.mask_token``, the registered index buffers (vilt_module.py
    l. 164-261, which the paper keeps "because the trained checkpoints have them") and, with
    ``num_frames >= 1`` (its default), the temporal table and buffers.
    """
    s, spec = shapes, {}
    rows_heads = s.heads * s.depth
    spec["relative_position_bias_table"] = ((s.table_rows, rows_heads), "table")
    video_len = s.image_len * s.num_frames
    if s.num_frames >= 1:
        spec["temporal_relative_position_bias_table"] = ((2 * s.num_frames, rows_heads), "table")
    spec["relative_position_index"] = ((s.image_len, s.image_len), "index")
    spec["text_relative_position_index"] = ((s.max_text_len, s.max_text_len), "index")
    n = s.max_text_len + s.image_len
    spec["text_imag_relative_position_index"] = ((n, n), "index")
    if s.max_vl_text_len is not None:
        n = s.max_vl_text_len + s.image_len
        spec["vl_text_imag_relative_position_index"] = ((n, n), "index")
    if s.num_frames >= 1:
        spec["video_relative_position_index"] = ((video_len, video_len), "index")
        n = s.max_text_len + video_len
        spec["text_video_relative_position_index"] = ((n, n), "index")
        spec["temporal_relative_position_index"] = ((video_len, video_len), "index")
        spec["mask_for_combining_temporal"] = ((1, video_len, video_len), "index")
        if s.max_vl_text_len is not None:
            n = s.max_vl_text_len + video_len
            spec["vl_text_video_relative_position_index"] = ((n, n), "index")
    _text_embeddings_spec(spec, s)
    spec["token_type_embeddings.weight"] = ((2, s.width), "token_type")
    spec["transformer.cls_token"] = ((1, 1, s.width), "embedding")
    spec["transformer.mask_token"] = ((1, 1, s.width), "embedding")
    _patch_embed_spec(spec, s)
    for i in range(s.depth):
        b = f"transformer.blocks.{i}"
        spec[f"{b}.gamma_1"] = ((s.width,), "gamma")
        spec[f"{b}.gamma_2"] = ((s.width,), "gamma")
        experts = s.experts(i)
        for m in experts:
            _attention_spec(spec, _paper_prefix(b, "attn", m), s.width)
        for m in experts:
            _layer_norm_spec(spec, _paper_prefix(b, "norm1", m), s.width)
        for m in experts:
            _mlp_spec(spec, _paper_prefix(b, "mlp", m), s.width, s.mlp_hidden)
        for m in experts:
            _layer_norm_spec(spec, _paper_prefix(b, "norm2", m), s.width)
    _layer_norm_spec(spec, "transformer.norm", s.width)
    _linear_spec(spec, "pooler.dense", s.width, s.width)
    return spec


def _paper_prefix(block: str, module: str, expert: str) -> str:
    return f"{block}.{module}.{expert}" if expert else f"{block}.{module}"


def _random_tensor(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> Tensor:
    """Non-trivial scales, so that every parameter visibly moves the output."""
    noise = torch.randn(shape, generator=generator)
    if kind == "weight":  # [out, in, ...]: unit-variance outputs for unit inputs
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        return noise / fan_in**0.5
    scale_offset = {
        "bias": (0.1, 0.0),
        "norm_weight": (0.1, 1.0),
        "gamma": (0.02, 0.1),
        "table": (0.5, 0.0),
        "embedding": (1.0, 0.0),
        "token_type": (0.5, 0.0),
        "position": (0.5, 0.0),
    }
    scale, offset = scale_offset[kind]
    return noise * scale + offset


def _fill(spec: Spec, seed: int, buffers: Callable[[str], Tensor]) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, kind) in spec.items():
        if kind == "position_ids":
            state[name] = torch.arange(shape[1]).unsqueeze(0)
        elif kind == "index":
            state[name] = buffers(name)
        else:
            state[name] = _random_tensor(shape, kind, generator)
    return state


def random_vlmo_state(shapes: VlmoShapes, seed: int, *, with_index_buffers: bool = False) -> dict[str, Tensor]:
    """A random VLMo backbone state dict with the real key names and shapes (see ``vlmo_state_spec``)."""
    s = shapes
    m = s.max_text_len_of_initckpt
    buffers = {
        "relative_position_index": lambda: image_relative_position_index(s.window),
        "text_relative_position_index": lambda: text_relative_position_index(s.window, s.max_text_len, m),
        "text_imag_relative_position_index": lambda: text_image_relative_position_index(s.window, s.max_text_len, m),
    }
    return _fill(vlmo_state_spec(s, with_index_buffers=with_index_buffers), seed, lambda name: buffers[name]())


def _paper_buffer(s: PaperShapes, name: str) -> Tensor:
    """The values of the paper's registered buffers (vilt_module.py l. 154-248)."""
    m, f = s.max_text_len_of_initckpt, s.num_frames
    image = image_relative_position_index(s.window)
    if name == "relative_position_index":
        return image
    if name == "text_relative_position_index":
        return text_relative_position_index(s.window, s.max_text_len, m)
    if name == "text_imag_relative_position_index":
        return text_image_relative_position_index(s.window, s.max_text_len, m)
    if name == "vl_text_imag_relative_position_index":
        return text_image_relative_position_index(s.window, s.max_vl_text_len, m)
    video = image.repeat(f, f)
    if name == "video_relative_position_index":
        return video
    if name in ("text_video_relative_position_index", "vl_text_video_relative_position_index"):
        text_len = s.max_text_len if name.startswith("text") else s.max_vl_text_len
        image_rows = _image_distances(s.window)
        out = torch.empty(text_len + video.shape[0], text_len + video.shape[0])
        out[:text_len, :text_len] = text_relative_position_index(s.window, text_len, m)
        out[:text_len, text_len:] = image_rows
        out[text_len:, :text_len] = image_rows + 1
        out[text_len:, text_len:] = video
        return out
    frames = torch.arange(f)
    if name == "temporal_relative_position_index":
        return (frames[None, :] - frames[:, None] + f - 1).repeat(s.image_len, s.image_len)
    if name == "mask_for_combining_temporal":
        eye = torch.eye(f).repeat_interleave(s.image_len, dim=1).repeat_interleave(s.image_len, dim=0)
        return eye.unsqueeze(0)
    raise KeyError(name)


def random_paper_state(shapes: PaperShapes, seed: int) -> dict[str, Tensor]:
    """A random state dict of the paper's model with its real key names and shapes (see ``paper_state_spec``)."""
    return _fill(paper_state_spec(shapes), seed, lambda name: _paper_buffer(shapes, name))


# ---------------------------------------------------------------------------
# Shared layers
# ---------------------------------------------------------------------------


def _layer_norm(x: Tensor, state: State, prefix: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def _mlp(x: Tensor, state: State, prefix: str) -> Tensor:
    hidden = F.gelu(F.linear(x, state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"]))
    return F.linear(hidden, state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"])


def _attention(x: Tensor, state: State, prefix: str, heads: int, mask: Tensor | None, bias: Tensor | None) -> Tensor:
    """q and v biases only; logits and softmax in float32; ``mask`` [B, N] marks real keys."""
    batch, n, width = x.shape
    q_bias, v_bias = state[f"{prefix}.q_bias"], state[f"{prefix}.v_bias"]
    qkv = F.linear(x, state[f"{prefix}.qkv.weight"], torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
    q, k, v = qkv.reshape(batch, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each [B, H, N, D]
    q = q * (width // heads) ** -0.5
    logits = q.float() @ k.float().transpose(-2, -1)  # [B, H, N, N]
    if bias is not None:
        logits = logits + bias.unsqueeze(0)
    if mask is not None:
        logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    weights = logits.softmax(dim=-1).type_as(x)
    out = (weights @ v).transpose(1, 2).reshape(batch, n, width)
    return F.linear(out, state[f"{prefix}.proj.weight"], state[f"{prefix}.proj.bias"])


def _text_embed(state: State, text_ids: Tensor, absolute_positions: bool) -> Tensor:
    """``BertEmbeddings`` (token type 0 from its buffer) plus the model's text token type 0."""
    x = F.embedding(text_ids, state["text_embeddings.word_embeddings.weight"])
    x = x + state["text_embeddings.token_type_embeddings.weight"][0]
    if absolute_positions:
        x = x + state["text_embeddings.position_embeddings.weight"][: text_ids.shape[1]]
    x = _layer_norm(x, state, "text_embeddings.LayerNorm", _BERT_LN_EPS)
    return x + state["token_type_embeddings.weight"][0]


def _image_embed(state: State, g: VlmoShapes | PaperShapes, images: Tensor, absolute_positions: bool) -> Tensor:
    """Patches (conv), cls first, optional ``pos_embed``, then image token type 1."""
    if images.shape[-2:] != (g.image_size, g.image_size):
        raise ValueError(f"images must be {g.image_size}x{g.image_size}, got {tuple(images.shape[-2:])}")
    w, b = state["transformer.patch_embed.proj.weight"], state["transformer.patch_embed.proj.bias"]
    x = F.conv2d(images, w, b, stride=g.patch_size).flatten(2).transpose(1, 2)  # [B, P, C]
    x = torch.cat([state["transformer.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    if absolute_positions:
        x = x + state["transformer.pos_embed"]
    return x + state["token_type_embeddings.weight"][1]


def _check_text(g: _Geometry, text_ids: Tensor, text_mask: Tensor, allow_shorter: bool = False) -> None:
    if text_ids.shape != text_mask.shape:
        raise ValueError(f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} differ")
    n = text_ids.shape[1]
    if n != g.max_text_len and not (allow_shorter and n < g.max_text_len):
        raise ValueError(f"text must be padded to max_text_len={g.max_text_len}, got length {n}")


def _encode(depth: int, block: Callable[[int, Tensor, str], Tensor], x: Tensor, route: str, vl_from: int | None):
    """Run every block with ``route``; with ``vl_from``, then rerun the vl layers as ``infer_*`` do."""
    hidden = []
    for i in range(depth):
        x = block(i, x, route)
        hidden.append(x)
    if vl_from is None:
        return x
    x = hidden[vl_from - 1]  # with vl_from = 0 this is the last layer, as in the source
    for i in range(vl_from, depth):
        x = block(i, x, "vl")
    return x


# ---------------------------------------------------------------------------
# VLMo
# ---------------------------------------------------------------------------


def _vlmo_block(state: State, s: VlmoShapes, i: int, x: Tensor, mask, bias, route: str) -> Tensor:
    """``Block.forward``: shared attention, then the FFN expert of ``route`` (image, text or vl)."""
    b = f"transformer.blocks.{i}"
    gamma_1 = state[f"{b}.gamma_1"] if s.layer_scale else 1.0
    gamma_2 = state[f"{b}.gamma_2"] if s.layer_scale else 1.0
    x = x + gamma_1 * _attention(
        _layer_norm(x, state, f"{b}.norm1", s.norm_eps), state, f"{b}.attn", s.heads, mask, bias
    )

    def ffn(h: Tensor, expert: str) -> Tensor:
        return h + gamma_2 * _mlp(_layer_norm(h, state, f"{b}.norm2_{expert}", s.norm_eps), state, f"{b}.mlp_{expert}")

    if route in ("imag", "text"):
        return ffn(x, route)
    if i >= s.vlffn_start_layer_index:
        return ffn(x, "vl")
    text, image = x[:, : s.max_text_len], x[:, s.max_text_len :]
    return torch.cat([ffn(text, "text"), ffn(image, "imag")], dim=1)


def _vlmo_run(state: State, s: VlmoShapes, x: Tensor, mask, index: Tensor, route: str, through_vl: bool) -> Tensor:
    layer_bias = _layer_biases(state["relative_position_bias_table"], index, s.heads) if s.relative_position else None

    def block(i: int, h: Tensor, r: str) -> Tensor:
        return _vlmo_block(state, s, i, h, mask, layer_bias(i) if layer_bias else None, r)

    x = _encode(s.depth, block, x, route, s.vlffn_start_layer_index if through_vl else None)
    return _layer_norm(x, state, "transformer.norm", s.norm_eps)


def _vlmo_image(state: State, s: VlmoShapes, images: Tensor, through_vl: bool) -> Tensor:
    x = _image_embed(state, s, images, absolute_positions=not s.relative_position)
    return _vlmo_run(state, s, x, None, image_relative_position_index(s.window), "imag", through_vl)


def _vlmo_text(state: State, s: VlmoShapes, text_ids: Tensor, text_mask: Tensor, through_vl: bool) -> Tensor:
    _check_text(s, text_ids, text_mask)
    x = _text_embed(state, text_ids, absolute_positions=not s.relative_position)
    index = text_relative_position_index(s.window, s.max_text_len, s.max_text_len_of_initckpt)
    return _vlmo_run(state, s, x, text_mask, index, "text", through_vl)


def vlmo_image(state: State, shapes: VlmoShapes, images: Tensor) -> Tensor:
    """``infer_image``'s hidden states after ``transformer.norm``: [B, 1 + patches, width]."""
    return _vlmo_image(state, shapes, images, through_vl=False)


def vlmo_image_through_vl(state: State, shapes: VlmoShapes, images: Tensor) -> Tensor:
    """``infer_image``'s ``vlffn_hiddens``: layer ``start - 1``'s output rerun through the vl layers."""
    return _vlmo_image(state, shapes, images, through_vl=True)


def vlmo_text(state: State, shapes: VlmoShapes, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """``infer_text``'s hidden states after ``transformer.norm``: [B, max_text_len, width]."""
    return _vlmo_text(state, shapes, text_ids, text_mask, through_vl=False)


def vlmo_text_through_vl(state: State, shapes: VlmoShapes, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """``infer_text``'s ``vlffn_hiddens``: layer ``start - 1``'s output rerun through the vl layers."""
    return _vlmo_text(state, shapes, text_ids, text_mask, through_vl=True)


def vlmo_pair(state: State, shapes: VlmoShapes, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """``infer``'s hidden states after ``transformer.norm``: text first, [B, max_text_len + 1 + patches, width]."""
    s = shapes
    _check_text(s, text_ids, text_mask)
    absolute = not s.relative_position
    x = torch.cat([_text_embed(state, text_ids, absolute), _image_embed(state, s, images, absolute)], dim=1)
    mask = torch.cat([text_mask.bool(), torch.ones(x.shape[0], s.image_len, dtype=torch.bool, device=x.device)], dim=1)
    index = text_image_relative_position_index(s.window, s.max_text_len, s.max_text_len_of_initckpt)
    return _vlmo_run(state, s, x, mask, index, "vl", through_vl=False)


# ---------------------------------------------------------------------------
# The paper's model
# ---------------------------------------------------------------------------


def _paper_expert_block(state: State, s: PaperShapes, i: int, x: Tensor, mask, bias, expert: str) -> Tensor:
    """One block with every sub-module taken from ``expert`` (``""``: the agnostic model)."""
    b = f"transformer.blocks.{i}"
    h = _layer_norm(x, state, _paper_prefix(b, "norm1", expert), s.norm_eps)
    x = x + state[f"{b}.gamma_1"] * _attention(h, state, _paper_prefix(b, "attn", expert), s.heads, mask, bias)
    h = _layer_norm(x, state, _paper_prefix(b, "norm2", expert), s.norm_eps)
    return x + state[f"{b}.gamma_2"] * _mlp(h, state, _paper_prefix(b, "mlp", expert))


def _paper_block(state: State, s: PaperShapes, i: int, x: Tensor, mask, bias: Tensor, route: str) -> Tensor:
    """``moe_forward`` / ``separate_plain_forward``: route is v (type 0), l (type 1) or vl (type 2)."""

    def expert(m: str) -> str:
        return m if s.multiway else ""

    if route in ("v", "l"):
        return _paper_expert_block(state, s, i, x, mask, bias, expert(route))
    if i >= s.fusion_layer:
        return _paper_expert_block(state, s, i, x, mask, bias, expert("vl"))
    t = s.max_text_len  # below the fusion layer each modality attends to itself only
    text = _paper_expert_block(state, s, i, x[:, :t], mask[:, :t], bias[:, :t, :t], expert("l"))
    image = _paper_expert_block(state, s, i, x[:, t:], mask[:, t:], bias[:, t:, t:], expert("v"))
    return torch.cat([text, image], dim=1)


def _paper_run(state: State, s: PaperShapes, x: Tensor, mask, index: Tensor, route: str, through_vl: bool) -> Tensor:
    layer_bias = _layer_biases(state["relative_position_bias_table"], index, s.heads)

    def block(i: int, h: Tensor, r: str) -> Tensor:
        return _paper_block(state, s, i, h, mask, layer_bias(i), r)

    x = _encode(s.depth, block, x, route, s.fusion_layer if through_vl else None)
    return _layer_norm(x, state, "transformer.norm", s.norm_eps)


def _paper_image(state: State, s: PaperShapes, images: Tensor, through_vl: bool) -> Tensor:
    x = _image_embed(state, s, images, absolute_positions=False)
    return _paper_run(state, s, x, None, image_relative_position_index(s.window), "v", through_vl)


def _paper_text(state: State, s: PaperShapes, text_ids: Tensor, text_mask: Tensor, through_vl: bool) -> Tensor:
    _check_text(s, text_ids, text_mask, allow_shorter=s.max_vl_text_len is not None)
    x = _text_embed(state, text_ids, absolute_positions=False)
    n = text_ids.shape[1]  # vilt_module.py l. 1177-1182: sliced to the true length when max_vl_text_len is set
    index = text_relative_position_index(s.window, s.max_text_len, s.max_text_len_of_initckpt)[:n, :n]
    return _paper_run(state, s, x, text_mask, index, "l", through_vl)


def paper_image(state: State, shapes: PaperShapes, images: Tensor) -> Tensor:
    """``infer_image``'s hidden states after ``transformer.norm``: [B, 1 + patches, width]."""
    return _paper_image(state, shapes, images, through_vl=False)


def paper_image_through_vl(state: State, shapes: PaperShapes, images: Tensor) -> Tensor:
    """``infer_image``'s ``vlffn_hiddens``: layer ``fusion - 1``'s output rerun through the vl layers."""
    return _paper_image(state, shapes, images, through_vl=True)


def paper_text(state: State, shapes: PaperShapes, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """``infer_text``'s hidden states after ``transformer.norm``: [B, T, width]."""
    return _paper_text(state, shapes, text_ids, text_mask, through_vl=False)


def paper_text_through_vl(state: State, shapes: PaperShapes, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """``infer_text``'s ``vlffn_hiddens``: layer ``fusion - 1``'s output rerun through the vl layers."""
    return _paper_text(state, shapes, text_ids, text_mask, through_vl=True)


def paper_pair(state: State, shapes: PaperShapes, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """``infer``'s hidden states after ``transformer.norm``: text first, [B, max_text_len + 1 + patches, width].

    The source uses ``vl_text_imag_relative_position_index`` when ``max_vl_text_len`` is set,
    which needs ``max_vl_text_len == max_text_len`` for its split at ``max_text_len``.
    """
    s = shapes
    _check_text(s, text_ids, text_mask)
    if s.max_vl_text_len is not None and s.max_vl_text_len != s.max_text_len:
        raise ValueError("a pair needs max_vl_text_len == max_text_len (the blocks split at max_text_len)")
    x = torch.cat([_text_embed(state, text_ids, False), _image_embed(state, s, images, False)], dim=1)
    mask = torch.cat([text_mask.bool(), torch.ones(x.shape[0], s.image_len, dtype=torch.bool, device=x.device)], dim=1)
    index = text_image_relative_position_index(s.window, s.max_text_len, s.max_text_len_of_initckpt)
    return _paper_run(state, s, x, mask, index, "vl", through_vl=False)
