"""The vision-language transformer, modality-specific (multiway) or modality-agnostic.

Routing is decided once per batch as a set of *streams*, each a token
sequence whose *segments* say which experts their tokens use: images -> one {v} segment,
text -> one {l} segment. A pair is either two streams kept apart (attention within each
modality, the paper's model) or one stream of a text and an image segment attending to each
other (VLMo, BEiT-3), until `fusion_layer`, where the pair becomes one {vl} segment with full
attention. The agnostic model runs the same graph; `select_expert` returns its single set of
weights.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.models.config import ModelConfig
from vlmerge.models.layers import Attention, Mlp, PatchEmbed, Pooler, TextEmbed, attend
from vlmerge.models.multiway import Multiway, multiway, select_expert
from vlmerge.models.positions import relative_index, table_rows

TEXT_TYPE, IMAGE_TYPE = 0, 1


@dataclass(frozen=True)
class Segment:
    """Tokens [start, stop) of a stream that use `modality`'s experts."""

    modality: Modality
    start: int
    stop: int


@dataclass
class Stream:
    """Tokens that attend to each other; `mask` is True for real (non-padding) tokens.

    `tokens` says what the tokens are (a text of n, an image of n, text then image), which fixes
    their relative positions; `segments` which experts they use in the current layer."""

    hidden: torch.Tensor  # (B, N, D)
    mask: torch.Tensor | None  # (B, N) bool, or None when nothing is padded
    tokens: tuple[tuple[Modality, int], ...]
    segments: tuple[Segment, ...]

    @classmethod
    def single(cls, hidden: torch.Tensor, mask: torch.Tensor | None, modality: Modality) -> "Stream":
        return cls(hidden, mask, ((modality, hidden.shape[1]),), (Segment(modality, 0, hidden.shape[1]),))

    def through_vl(self) -> "Stream":
        """The same tokens, all using the vl experts (from the fusion layer on)."""
        return replace(self, segments=(Segment(Modality.VL, 0, self.hidden.shape[1]),))

    @property
    def modality(self) -> Modality | None:
        """The experts every token uses; None for a stream whose segments differ."""
        kinds = {segment.modality for segment in self.segments}
        return kinds.pop() if len(kinds) == 1 else None


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, N, D), after the final norm
    mask: torch.Tensor | None
    modality: Modality | None  # the experts the final layer used: v, l or vl; None if text and image kept theirs
    num_text_tokens: int  # text tokens lead the sequence of a pair

    @property
    def cls(self) -> torch.Tensor:
        return self.hidden[:, 0]


def run_per_segment(module: nn.Module, x: torch.Tensor, segments: tuple[Segment, ...]) -> torch.Tensor:
    """`module` on each segment's tokens with that segment's expert; a shared module on all at once."""
    if len(segments) == 1 or not isinstance(module, Multiway):
        return select_expert(module, segments[0].modality)(x)
    parts = [select_expert(module, s.modality)(x[:, s.start : s.stop]) for s in segments]
    return torch.cat(parts, dim=1)


class Block(nn.Module):
    """Pre-LayerNorm block with optional layer scale; each sub-module is shared or per-modality."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        width, slots, eps = config.width, config.placement.slots, config.norm_eps
        modalities = config.modalities_at(layer)
        hidden = int(width * config.mlp_ratio)

        def per_modality(slot: str, factory):
            return multiway(factory, modalities if slot in slots else None)

        def attention() -> Attention:
            return Attention(
                width,
                config.heads,
                separate=config.qkv == "separate",
                k_bias=config.k_bias,
                sub_ln=config.sub_ln,
                eps=eps,
            )

        self.norm1 = per_modality("norm1", lambda: nn.LayerNorm(width, eps=eps))
        self.attn = per_modality("attn", attention)
        self.norm2 = per_modality("norm2", lambda: nn.LayerNorm(width, eps=eps))
        self.mlp = per_modality("mlp", lambda: Mlp(width, hidden, sub_ln=config.sub_ln, eps=eps))
        if config.layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((width,), config.layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((width,), config.layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self,
        x: torch.Tensor,
        segments: tuple[Segment, ...],
        mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: the stream's token mask (read by Gram hooks); `attn_mask`: what attention adds or keeps."""
        attended = self._attention(run_per_segment(self.norm1, x, segments), segments, attn_mask)
        x = x + (attended if self.gamma_1 is None else self.gamma_1 * attended)
        transformed = run_per_segment(self.mlp, run_per_segment(self.norm2, x, segments), segments)
        return x + (transformed if self.gamma_2 is None else self.gamma_2 * transformed)

    def _attention(self, x: torch.Tensor, segments: tuple[Segment, ...], attn_mask: torch.Tensor | None):
        if len(segments) == 1 or not isinstance(self.attn, Multiway):
            return select_expert(self.attn, segments[0].modality)(x, attn_mask)
        experts = [(s, select_expert(self.attn, s.modality)) for s in segments]
        projected = [expert.project(x[:, s.start : s.stop]) for s, expert in experts]
        q, k, v = (torch.cat(parts, dim=1) for parts in zip(*projected))
        attended = attend(q, k, v, experts[0][1].heads, attn_mask)
        return torch.cat([expert.output(attended[:, s.start : s.stop]) for s, expert in experts], dim=1)


class VLTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        if config.image_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        rows = config.num_patches + 1 + config.position_offset
        self.pos_embed = nn.Parameter(torch.zeros(1, rows, width)) if config.image_positions else None
        self.text_embed = TextEmbed(
            config.vocab_size,
            config.max_text_len,
            width,
            config.text_norm_eps,
            positions=config.text_positions,
            position_table=config.text_position_table,
            offset=config.position_offset,
            type_embedding=config.text_type_embedding,
            norm=config.text_norm,
        )
        self.token_type_embed = nn.Embedding(2, width) if config.token_types else None
        if config.position_bias == "relative":
            shape = (table_rows(config.window, config.relative_text_span), config.heads * config.depth)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(shape))
        else:
            self.relative_position_bias_table = None
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.depth))
        # A per-modality final norm sits outside the blocks, so it passes through a merge unchanged.
        final_experts = (Modality.V, Modality.L, Modality.VL) if config.vl_experts else (Modality.V, Modality.L)
        norm_experts = final_experts if config.final_norm_experts else None
        self.norm = multiway(lambda: nn.LayerNorm(width, eps=config.norm_eps), norm_experts)
        self.pooler = Pooler(width) if config.pooler else None
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed[:, self.config.position_offset :]
        if self.token_type_embed is not None:
            tokens = tokens + self.token_type_embed.weight[IMAGE_TYPE]
        return tokens

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        if text_ids.shape[1] > self.config.max_text_len:
            raise ConfigError(f"text of {text_ids.shape[1]} tokens exceeds max_text_len {self.config.max_text_len}")
        tokens = self.text_embed(text_ids)
        if self.token_type_embed is not None:
            tokens = tokens + self.token_type_embed.weight[TEXT_TYPE]
        return tokens

    def forward(
        self,
        images: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        unimodal_through_vl: bool = False,
    ) -> EncoderOutput:
        """Encode images, text, or image-text pairs (both given).

        `unimodal_through_vl` sends a single modality through the vl experts from the fusion
        layer on, as the paper does to train those experts on each modality alone.
        """
        streams: list[Stream] = []
        if text_ids is not None:
            streams.append(Stream.single(self.embed_text(text_ids), _as_bool(text_mask), Modality.L))
        if images is not None:
            streams.append(Stream.single(self.embed_image(images), None, Modality.V))
        if not streams:
            raise ConfigError("nothing to encode: pass images, text_ids, or both")
        if unimodal_through_vl and not self.config.vl_experts:
            raise ConfigError("this model has no vl experts to send a single modality through")
        num_text = text_ids.shape[1] if text_ids is not None else 0
        is_pair = len(streams) == 2
        if is_pair and self.config.pair_attention == "across":
            streams = [join(*streams)]
        biases: dict[tuple, RelativeBias] = {}  # by token layout: a pair joined from the start keeps its own

        def bias_of(stream: Stream) -> RelativeBias:
            if stream.tokens not in biases:
                biases[stream.tokens] = RelativeBias(self, stream.tokens)
            return biases[stream.tokens]

        for layer, block in enumerate(self.blocks):
            if layer == self.config.fusion_layer and (is_pair or unimodal_through_vl):
                streams = [(join(*streams) if len(streams) == 2 else streams[0]).through_vl()]
            streams = [
                replace(s, hidden=block(s.hidden, s.segments, s.mask, bias_of(s).attn_mask(layer, s.mask)))
                for s in streams
            ]
        if len(streams) != 1:
            raise ConfigError("image-text pairs need a fusion layer or attention across modalities")
        (stream,) = streams
        hidden = run_per_segment(self.norm, stream.hidden, stream.segments)
        return EncoderOutput(hidden, stream.mask, stream.modality, num_text)

    def pool(self, output: EncoderOutput) -> torch.Tensor:
        if self.pooler is None:
            raise ConfigError("this model has no pooler")
        return self.pooler(output.hidden)


class RelativeBias:
    """Per layer, what attention adds for one stream's tokens: the shared table's bias (relative
    positions) and -inf on padded keys; without a table, the padding mask alone (or None)."""

    def __init__(self, model: VLTransformer, tokens: tuple[tuple[Modality, int], ...]) -> None:
        table, config = model.relative_position_bias_table, model.config
        self.heads = config.heads
        self.per_layer = None
        if table is not None:
            index = relative_index(tokens, config.window, config.relative_text_span).to(table.device)
            self.per_layer = table[index].permute(2, 0, 1)  # (heads x depth, N, N)

    def attn_mask(self, layer: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        keys = None if mask is None else mask[:, None, None, :]  # True = attend to that key
        if self.per_layer is None:
            return keys
        bias = self.per_layer[layer * self.heads : (layer + 1) * self.heads].unsqueeze(0)
        if keys is None:
            return bias
        return bias.masked_fill(~keys, float("-inf"))


def join(text: Stream, image: Stream) -> Stream:
    """Text then image tokens in one stream: they attend to each other, each keeping its experts."""
    hidden = torch.cat([text.hidden, image.hidden], dim=1)
    n = text.hidden.shape[1]
    mask = None
    if text.mask is not None:
        image_mask = torch.ones(image.hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = torch.cat([text.mask, image_mask], dim=1)
    image_segments = tuple(replace(s, start=s.start + n, stop=s.stop + n) for s in image.segments)
    return Stream(hidden, mask, text.tokens + image.tokens, text.segments + image_segments)


def _as_bool(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.bool()


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
