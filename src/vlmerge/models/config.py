"""Model configuration: size, fusion layer, and where the modality experts sit."""

from enum import Enum
from typing import Literal, Self

from pydantic import AliasChoices, Field, field_validator, model_validator

from vlmerge.core.config import StrictConfig
from vlmerge.core.modality import Modality


class ExpertPlacement(str, Enum):
    """Which block sub-modules hold one copy per modality (the paper's architecture study)."""

    ALL = "all"  # attention + norm1 and FFN + norm2 (the paper's main model)
    ATTENTION = "attention"  # attention + norm1; FFN shared
    FFN = "ffn"  # FFN + norm2; attention shared (VLMo-like)
    NORMS = "norms"  # only the two layer norms
    NONE = "none"  # modality-agnostic: one set of weights

    @property
    def slots(self) -> frozenset[str]:
        return _SLOTS[self]


_SLOTS = {
    ExpertPlacement.ALL: frozenset({"norm1", "attn", "norm2", "mlp"}),
    ExpertPlacement.ATTENTION: frozenset({"norm1", "attn"}),
    ExpertPlacement.FFN: frozenset({"norm2", "mlp"}),
    ExpertPlacement.NORMS: frozenset({"norm1", "norm2"}),
    ExpertPlacement.NONE: frozenset(),
}


class ModelConfig(StrictConfig):
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    fusion_layer: int | None = None  # first layer with a vl expert; default: the last two layers
    # Where the experts sit; checkpoints written before the rename call it `experts`.
    placement: ExpertPlacement = Field(ExpertPlacement.ALL, validation_alias=AliasChoices("placement", "experts"))
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    vocab_size: int = 30522
    max_text_len: int = 40
    layer_scale_init: float = 0.1
    norm_eps: float = 1e-6
    # The options below let the one model run the public families' weights exactly; the defaults are
    # vlmerge's native model. `family` names a registered Family (models/families.py): which layouts the
    # weights may be written in, and the options its released files are read with.
    family: str = "native"
    vl_experts: bool = True  # vl experts from fusion_layer on; BEiT-3 has none (pairs keep v and l)
    pair_attention: Literal["within", "across"] = "within"  # below the fusion layer (across: VLMo, BEiT-3)
    qkv: Literal["fused", "separate"] = "fused"  # one qkv Linear (VLMo) or q_proj/k_proj/v_proj (BEiT-3)
    k_bias: bool = False  # the key projection's bias (BEiT-3); q and v always have one
    sub_ln: bool = False  # LayerNorm before the attention output projection and before fc2 (BEiT-3)
    layer_scale: bool = True  # gamma_1/gamma_2 (absent in BEiT-3 and VLMo base+)
    position_bias: Literal["none", "relative"] = "none"  # relative: one table shared by all layers (VLMo)
    relative_text_span: int | None = None  # VLMo's max_text_len_of_initckpt; default max_text_len
    image_positions: bool = True  # absolute image position table (pos_embed)
    text_positions: bool = True  # absolute text positions added to the text embeddings
    text_position_table: bool | None = None  # the table exists (default: text_positions); VLMo carries it unused
    position_offset: int = 0  # leading unused rows of the position tables (fairseq's 2 in BEiT-3)
    text_norm: bool = True  # LayerNorm on the text embeddings (BERT style)
    text_norm_eps: float | None = None  # its epsilon; default norm_eps (BERT's is 1e-12)
    text_type_embedding: bool = False  # BERT's own token-type table inside the text embeddings (VLMo)
    token_types: bool = True  # the text/image token-type table added to every token
    final_norm_experts: bool = False  # one final LayerNorm per modality (BEiT-3)
    pooler: bool = True  # tanh pooler on the first token (VLMo, native)
    image_mask_token: bool = False  # masked-image-modelling token; carried, unused by the encoder (BEiT-3)

    @field_validator("family", mode="before")
    @classmethod
    def _registered_family(cls, family: object) -> object:
        from vlmerge.models.families import FAMILIES  # imported here: the families build configs of this class

        if not isinstance(family, str) or family not in FAMILIES:
            *others, last = (repr(name) for name in FAMILIES)
            raise ValueError(f"Input should be {', '.join(others)} or {last}")
        return family

    @model_validator(mode="after")
    def _check(self) -> Self:
        if min(self.width, self.depth, self.heads) <= 0:
            raise ValueError("width, depth and heads must be positive")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.fusion_layer is None:
            object.__setattr__(self, "fusion_layer", max(self.depth - 2, 0) if self.vl_experts else self.depth)
        if self.vl_experts and not 0 <= self.fusion_layer < self.depth:
            raise ValueError(f"fusion_layer {self.fusion_layer} must lie in [0, depth={self.depth})")
        if not self.vl_experts and self.fusion_layer != self.depth:
            raise ValueError(f"a model without vl experts has no fusion layer (fusion_layer is {self.fusion_layer})")
        if self.text_position_table is None:
            object.__setattr__(self, "text_position_table", self.text_positions)
        if self.text_positions and not self.text_position_table:
            raise ValueError("text_positions needs text_position_table")
        if self.text_norm_eps is None:
            object.__setattr__(self, "text_norm_eps", self.norm_eps)
        if self.relative_text_span is None:
            object.__setattr__(self, "relative_text_span", self.max_text_len)
        if self.relative_text_span < self.max_text_len:
            raise ValueError(
                f"relative_text_span {self.relative_text_span} is below max_text_len {self.max_text_len}: "
                "text positions that far apart would have no relative bias"
            )
        if self.position_offset < 0:
            raise ValueError(f"position_offset must be >= 0, got {self.position_offset}")
        return self

    @property
    def is_multiway(self) -> bool:
        return self.placement is not ExpertPlacement.NONE

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def window(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    def modalities_at(self, layer: int) -> tuple[Modality, ...]:
        """Experts a multiway layer holds: v and l everywhere, vl from the fusion layer on."""
        if self.vl_experts and layer >= self.fusion_layer:
            return (Modality.V, Modality.L, Modality.VL)
        return (Modality.V, Modality.L)

    def agnostic(self) -> "ModelConfig":
        """The modality-agnostic twin: same graph, one set of weights per layer."""
        return self.model_copy(update={"placement": ExpertPlacement.NONE})

    def with_placement(self, placement: ExpertPlacement | str) -> "ModelConfig":
        return self.model_copy(update={"placement": ExpertPlacement(placement)})
