"""Key names of the paper's released checkpoints, as a rename table both ways.

Our native names differ from the paper's (ViLT/VLMo code) only by prefixes outside the
blocks; inside a block both use `blocks.{i}.{attn|mlp|norm1|norm2}.{modality}.{...}`,
so converting is a prefix rename and never needs the layer count.
"""

import re
from enum import Enum

from vlmerge.core.errors import CheckpointError


class Layout(str, Enum):
    NATIVE = "native"
    REFERENCE = "reference"


# (native prefix, reference prefix). A prefix ending in "." renames a whole subtree;
# any other entry renames one exact key.
PREFIX_RENAMES: tuple[tuple[str, str], ...] = (
    ("blocks.", "transformer.blocks."),
    ("patch_embed.", "transformer.patch_embed."),
    ("cls_token", "transformer.cls_token"),
    ("pos_embed", "transformer.pos_embed"),
    ("norm.", "transformer.norm."),
    ("text_embed.word.", "text_embeddings.word_embeddings."),
    ("text_embed.position.", "text_embeddings.position_embeddings."),
    ("text_embed.norm.", "text_embeddings.LayerNorm."),
    ("token_type_embed.", "token_type_embeddings."),
)

# Gram matrices in the paper are keyed by the module whose *input* they describe, and the
# attention module itself stands for its qkv projection.
_REFERENCE_QKV_GRAM = re.compile(r"^(transformer\.blocks\.\d+\.attn(?:\.(?:v|l|vl))?)$")
_NATIVE_QKV_GRAM = re.compile(r"^(blocks\.\d+\.attn(?:\.(?:v|l|vl))?)\.qkv$")


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for source, target in pairs:
        if source.endswith(".") and key.startswith(source):
            return target + key[len(source):]
        if key == source:
            return target
    return key


def to_reference_key(native_key: str) -> str:
    return _rename(native_key, PREFIX_RENAMES)


def from_reference_key(reference_key: str) -> str:
    return _rename(reference_key, tuple((ref, nat) for nat, ref in PREFIX_RENAMES))


def is_reference_layout(keys: "list[str] | tuple[str, ...]") -> bool:
    """The paper's checkpoints nest the encoder under `transformer.`."""
    return any(k.startswith("transformer.blocks.") for k in keys)


def rename_keys(keys: list[str], rename) -> dict[str, str]:
    """Map old -> new names, refusing a rename that would merge two keys into one."""
    mapping = {key: rename(key) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        for old, new in mapping.items():
            if new in seen:
                raise CheckpointError(f"keys {seen[new]!r} and {old!r} both map to {new!r}; the file mixes layouts")
            seen[new] = old
    return mapping


def gram_key_from_reference(reference_key: str) -> str:
    match = _REFERENCE_QKV_GRAM.match(reference_key)
    native = from_reference_key(reference_key)
    return f"{native}.qkv" if match else native


def gram_key_to_reference(native_key: str) -> str:
    match = _NATIVE_QKV_GRAM.match(native_key)
    return to_reference_key(match.group(1) if match else native_key)
