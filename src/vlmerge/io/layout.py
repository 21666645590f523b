"""Key names of the paper's released checkpoints, as a rename table both ways.

Our native names differ from the paper's (ViLT/VLMo code) only by prefixes outside the
blocks; inside a block both use `blocks.{i}.{attn|mlp|norm1|norm2}.{modality}.{...}`,
so converting is a prefix rename and never needs the layer count. A layout renames its keys
to native ones first; past that, paths are parsed only by `vlmerge.core.keys`.
"""

from enum import Enum

from vlmerge.core.errors import CheckpointError
from vlmerge.core.keys import parse_block_path


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

REFERENCE_BLOCKS_PREFIX = "transformer."  # where the paper's checkpoints nest the blocks


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for source, target in pairs:
        if source.endswith(".") and key.startswith(source):
            return target + key[len(source) :]
        if key == source:
            return target
    return key


def to_reference_key(native_key: str) -> str:
    return _rename(native_key, PREFIX_RENAMES)


def from_reference_key(reference_key: str) -> str:
    return _rename(reference_key, tuple((ref, nat) for nat, ref in PREFIX_RENAMES))


def is_reference_layout(keys: "list[str] | tuple[str, ...]") -> bool:
    """The paper's checkpoints nest the encoder under `transformer.`."""
    return any(path.prefix == REFERENCE_BLOCKS_PREFIX for path in map(parse_block_path, keys) if path is not None)


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


# Gram matrices are keyed by the module whose input they describe; in the paper's files the
# attention module's own path (`transformer.blocks.3.attn.v`) stands for its qkv input.
def native_gram_key(key: str, layout: Layout) -> str:
    """The native module path of the Gram matrix a file of `layout` keys as `key`, whose
    prefixes are already native (as a CheckpointReader's keys are)."""
    path = parse_block_path(key)
    if layout is Layout.REFERENCE and path is not None and path.slot == "attn" and not path.rest:
        return path.child("qkv").key
    return key


def gram_key_to_reference(native_key: str) -> str:
    """The key the paper's Gram files give the matrix of native module `native_key`."""
    path = parse_block_path(native_key)
    if path is not None and path.slot == "attn" and path.rest == "qkv":
        native_key = path.module().key
    return to_reference_key(native_key)
