"""Paths of modules and tensors inside the transformer blocks: the one parser and formatter.

A native path is `{prefix}blocks.{layer}.{slot}.{modality}.{rest}`. A slot (`attn`, `mlp`,
`norm1`, `norm2`, `gamma_1`, ...) holds one sub-module shared by every modality, or one expert
per modality; the modality-agnostic model's path is the expert's with the `.{modality}`
segment dropped. The prefix places the blocks inside a larger model (`transformer.` in the
paper's files). Foreign layouts are renamed to native paths first (io/layout.py), so this
parser never sees another naming scheme.
"""

import re
from dataclasses import dataclass, replace

from vlmerge.core.modality import Modality

MAX_LAYER_DIGITS = 6  # a layer index; a longer run of digits is no layer (and int() refuses over 4300 digits)
LAYER_INDEX = rf"0|[1-9][0-9]{{0,{MAX_LAYER_DIGITS - 1}}}"
_SEGMENTS = r"[^.]+(?:\.[^.]+)*"
# The prefix is greedy: with blocks nested in blocks, the innermost block is the one parsed.
_BLOCK_PATH = re.compile(
    rf"(?P<prefix>(?:[^.]+\.)*)blocks\.(?P<layer>{LAYER_INDEX})\.(?P<slot>\w+)"
    rf"(?:\.(?P<modality>v|l|vl)(?=\.|\Z))?(?:\.(?P<rest>{_SEGMENTS}))?"
)


def block_key(layer: int, inner: str, prefix: str = "") -> str:
    """`{prefix}blocks.{layer}.{inner}`: the one place a block's key is spelled."""
    return f"{prefix}blocks.{layer}.{inner}"


@dataclass(frozen=True)
class BlockPath:
    """A module or tensor path inside one transformer block; `str()` gives the path back."""

    prefix: str  # "" or ending in ".": where the blocks sit in a larger model, e.g. "transformer."
    layer: int
    slot: str  # the block's child: attn, mlp, norm1, norm2, gamma_1, ...
    modality: Modality | None  # the expert; None where one sub-module serves every modality
    rest: str = ""  # below the slot and expert: "qkv.weight", "q_bias"; "" names the slot itself

    @property
    def key(self) -> str:
        inner = [self.slot, self.modality.value if self.modality else "", self.rest]
        return block_key(self.layer, ".".join(part for part in inner if part), self.prefix)

    def __str__(self) -> str:
        return self.key

    def merged(self) -> "BlockPath":
        """The same path in the modality-agnostic model: the expert segment dropped."""
        return replace(self, modality=None)

    def module(self) -> "BlockPath":
        """The module holding this tensor (`blocks.3.mlp.l.fc1` for `blocks.3.mlp.l.fc1.weight`);
        a Gram matrix is keyed by the module whose input it describes."""
        if not self.rest:
            raise ValueError(f"{self.key} names a slot or an expert, not a tensor inside one")
        return replace(self, rest=self.rest.rpartition(".")[0])

    def child(self, name: str) -> "BlockPath":
        """The path one level down: `blocks.3.attn.v` -> `blocks.3.attn.v.qkv`."""
        return replace(self, rest=f"{self.rest}.{name}" if self.rest else name)


def parse_block_path(key: str) -> BlockPath | None:
    """The parts of a native path inside a block; None for anything outside the blocks
    (embeddings, final norm, heads). A parsed path formats back to `key` unchanged."""
    match = _BLOCK_PATH.fullmatch(key)
    if match is None:
        return None
    modality = Modality(match["modality"]) if match["modality"] else None
    return BlockPath(match["prefix"], int(match["layer"]), match["slot"], modality, match["rest"] or "")
