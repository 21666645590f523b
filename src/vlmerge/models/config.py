"""Model configuration: size, fusion layer, and where the modality experts sit."""

from enum import Enum
from typing import Self

from pydantic import AliasChoices, Field, model_validator

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

    @model_validator(mode="after")
    def _check(self) -> Self:
        if min(self.width, self.depth, self.heads) <= 0:
            raise ValueError("width, depth and heads must be positive")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.fusion_layer is None:
            object.__setattr__(self, "fusion_layer", max(self.depth - 2, 0))
        if not 0 <= self.fusion_layer < self.depth:
            raise ValueError(f"fusion_layer {self.fusion_layer} must lie in [0, depth={self.depth})")
        return self

    @property
    def is_multiway(self) -> bool:
        return self.placement is not ExpertPlacement.NONE

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def modalities_at(self, layer: int) -> tuple[Modality, ...]:
        """Experts a multiway layer holds: v and l everywhere, vl from the fusion layer on."""
        if layer >= self.fusion_layer:
            return (Modality.V, Modality.L, Modality.VL)
        return (Modality.V, Modality.L)

    def agnostic(self) -> "ModelConfig":
        """The modality-agnostic twin: same graph, one set of weights per layer."""
        return self.model_copy(update={"placement": ExpertPlacement.NONE})

    def with_placement(self, placement: ExpertPlacement | str) -> "ModelConfig":
        return self.model_copy(update={"placement": ExpertPlacement(placement)})
