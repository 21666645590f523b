"""The vision-language transformer, modality-specific (multiway) or modality-agnostic.

Routing (SPEC section 1) is decided once per batch as a set of *streams*, each a token
sequence with the modality whose experts it uses: images -> {v}, text -> {l}, a pair ->
{l, v} kept apart (attention within each modality) until `fusion_layer`, where the two
are concatenated into one {vl} stream with full attention. The agnostic model runs the
same graph; `select_expert` simply returns its single set of weights.
"""

from dataclasses import dataclass

import torch
from torch import nn

from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.models.config import ModelConfig
from vlmerge.models.layers import Attention, Mlp, PatchEmbed, Pooler, TextEmbed
from vlmerge.models.multiway import multiway, select_expert

TEXT_TYPE, IMAGE_TYPE = 0, 1


@dataclass
class Stream:
    """Tokens that share one expert per layer; `mask` is True for real (non-padding) tokens."""

    hidden: torch.Tensor  # (B, N, D)
    mask: torch.Tensor | None  # (B, N) bool, or None when nothing is padded


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, N, D), after the final norm
    mask: torch.Tensor | None
    modality: Modality  # the experts the final layer used: v, l or vl
    num_text_tokens: int  # text tokens lead the sequence of a fused pair

    @property
    def cls(self) -> torch.Tensor:
        return self.hidden[:, 0]


class Block(nn.Module):
    """Pre-LayerNorm block with layer scale; each sub-module is shared or per-modality."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        width, slots = config.width, config.placement.slots
        modalities = config.modalities_at(layer)

        def per_modality(slot: str, factory):
            return multiway(factory, modalities if slot in slots else None)

        self.norm1 = per_modality("norm1", lambda: nn.LayerNorm(width, eps=config.norm_eps))
        self.attn = per_modality("attn", lambda: Attention(width, config.heads))
        self.norm2 = per_modality("norm2", lambda: nn.LayerNorm(width, eps=config.norm_eps))
        self.mlp = per_modality("mlp", lambda: Mlp(width, int(width * config.mlp_ratio)))
        self.gamma_1 = nn.Parameter(torch.full((width,), config.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((width,), config.layer_scale_init))

    def forward(self, x: torch.Tensor, modality: Modality, mask: torch.Tensor | None) -> torch.Tensor:
        def expert(module: nn.Module) -> nn.Module:
            return select_expert(module, modality)

        x = x + self.gamma_1 * expert(self.attn)(expert(self.norm1)(x), mask)
        return x + self.gamma_2 * expert(self.mlp)(expert(self.norm2)(x))


class VLTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        self.text_embed = TextEmbed(config.vocab_size, config.max_text_len, width, config.norm_eps)
        self.token_type_embed = nn.Embedding(2, width)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.depth))
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.pooler = Pooler(width)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.pos_embed
        return tokens + self.token_type_embed.weight[IMAGE_TYPE]

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        if text_ids.shape[1] > self.config.max_text_len:
            raise ConfigError(f"text of {text_ids.shape[1]} tokens exceeds max_text_len {self.config.max_text_len}")
        return self.text_embed(text_ids) + self.token_type_embed.weight[TEXT_TYPE]

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
        streams: dict[Modality, Stream] = {}
        if images is not None:
            streams[Modality.V] = Stream(self.embed_image(images), None)
        if text_ids is not None:
            streams[Modality.L] = Stream(self.embed_text(text_ids), _as_bool(text_mask))
        if not streams:
            raise ConfigError("nothing to encode: pass images, text_ids, or both")
        num_text = text_ids.shape[1] if text_ids is not None else 0
        is_pair = len(streams) == 2
        for layer, block in enumerate(self.blocks):
            if layer == self.config.fusion_layer and (is_pair or unimodal_through_vl):
                streams = {
                    Modality.VL: fuse(streams[Modality.L], streams[Modality.V])
                    if is_pair
                    else next(iter(streams.values()))
                }
            streams = {m: Stream(block(s.hidden, m, s.mask), s.mask) for m, s in streams.items()}
        if len(streams) != 1:
            raise ConfigError("image-text pairs need fusion_layer < depth")
        ((modality, stream),) = streams.items()
        return EncoderOutput(self.norm(stream.hidden), stream.mask, modality, num_text)

    def pool(self, output: EncoderOutput) -> torch.Tensor:
        return self.pooler(output.hidden)


def fuse(text: Stream, image: Stream) -> Stream:
    """Concatenate text then image tokens into one stream with full cross-modal attention."""
    hidden = torch.cat([text.hidden, image.hidden], dim=1)
    if text.mask is None:
        return Stream(hidden, None)
    image_mask = torch.ones(image.hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return Stream(hidden, torch.cat([text.mask, image_mask], dim=1))


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
