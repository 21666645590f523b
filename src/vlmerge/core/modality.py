"""The three expert modalities of a multiway transformer."""

from enum import Enum


class Modality(str, Enum):
    """Which expert a token uses: vision, language, or fused vision-language."""

    V = "v"
    L = "l"
    VL = "vl"

    def __str__(self) -> str:
        return self.value


ALL_MODALITIES: tuple[Modality, ...] = (Modality.V, Modality.L, Modality.VL)
