"""Key layouts of the checkpoints vlmerge reads and writes, as rename tables both ways.

A layout is data: an ordered list of rules, each a native pattern and a foreign one over the
same named parts (`{layer}`, `{expert}`, `{rest}`, or a choice such as `{proj:q_proj|k_proj}`),
with the foreign names of the experts and, where the two differ, a shape change (BEiT-3 keeps
position tables as an Embedding's (rows, width), we as (1, rows, width)). The first rule whose
pattern matches renames a key; a key no rule matches (task heads, projections) keeps its name.
Past this module every path is native and parsed only by `vlmerge.core.keys`.

- `native`: vlmerge's own names.
- `reference`: the paper's released files (ViLT/VLMo code): `transformer.blocks.{i}.attn.v...`.
- `vlmo`: microsoft/unilm VLMo: shared attention, `mlp_imag|mlp_text|mlp_vl`, `norm2_*`.
- `beit3`: torchscale's BEiT3 (unilm's beit3 wraps it as `beit3.`): every module an `A` (vision)
  and `B` (language) expert.

Writing a merged (modality-agnostic) model in a multiway layout ties its experts: the one merged
tensor is written under every expert's name, so the family's own code loads it unchanged.
"""

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from vlmerge.core.errors import CheckpointError
from vlmerge.core.keys import LAYER_INDEX, MAX_LAYER_DIGITS, parse_block_path
from vlmerge.core.modality import Modality


class Layout(str, Enum):
    NATIVE = "native"
    REFERENCE = "reference"
    VLMO = "vlmo"
    BEIT3 = "beit3"


_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")


@dataclass(frozen=True)
class KeyRule:
    """One native pattern and its foreign twin; `add_batch_dim`: native is (1, *foreign shape)."""

    native: str
    foreign: str
    add_batch_dim: bool = False


@dataclass(frozen=True)
class LayoutSpec:
    """A layout's rules, its experts' foreign names, and how to recognise its files."""

    layout: Layout
    rules: tuple[KeyRule, ...]
    experts: dict[Modality, str]  # native modality -> its name in this layout's keys
    signature: str  # a regex some key of every file of this layout matches (searched from the start)
    prefixes: tuple[str, ...] = ("",)  # optional wrappers of the whole model (unilm's `beit3.`)
    # Keys (regexes) the family stores but its forward never reads (buffers computed from the shapes,
    # video tables), each with the key whose presence makes it unused (None: always). They are read
    # and passed through a merge written in this layout, left out of a model and of other layouts.
    unused: tuple[tuple[str, str | None], ...] = ()
    summary: str = ""
    _compiled: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        for rule in self.rules:
            choices = {m[1]: m[2] for m in _PLACEHOLDER.finditer(rule.native + rule.foreign) if m[2]}
            self._compiled.append(
                (
                    rule,
                    _compile(rule.native, self._native_experts(), choices, optional_expert=True),
                    _compile(rule.foreign, self._foreign_experts(), choices),
                )
            )

    def _native_experts(self) -> str:
        return "|".join(re.escape(m.value) for m in sorted(self.experts, key=lambda m: -len(m.value)))

    def _foreign_experts(self) -> str:
        return "|".join(re.escape(name) for name in sorted(self.experts.values(), key=lambda n: -len(n)))

    def is_unused(self, key: str, keys: "set[str]") -> bool:
        return any(re.fullmatch(pattern, key) and (when is None or when in keys) for pattern, when in self.unused)

    def to_native(self, key: str) -> tuple[str, bool]:
        """(native key, whether the tensor gains a leading batch dimension)."""
        foreign_expert = {name: m.value for m, name in self.experts.items()}
        for rule, _, foreign in self._compiled:
            match = foreign.fullmatch(key)
            if match:
                parts = match.groupdict()
                if parts.get("expert") is not None:
                    parts["expert"] = foreign_expert[parts["expert"]]
                return _fill(rule.native, parts), rule.add_batch_dim
        return key, False

    def to_foreign(
        self, key: str, experts_at: Callable[[int], Iterable[Modality] | None] | None = None
    ) -> list[tuple[str, bool]]:
        """The foreign keys a native key is written as, with whether the batch dimension is dropped.

        A merged key (no expert segment) of a rule with experts is written once per expert the
        layer has (`experts_at(layer)`; every expert of the layout where it gives None): tied."""
        for rule, native, _ in self._compiled:
            match = native.fullmatch(key)
            if not match:
                continue
            parts = match.groupdict()
            if "{expert" not in rule.native:
                return [(_fill(rule.foreign, parts), rule.add_batch_dim)]
            if parts.get("expert") is not None:
                parts["expert"] = self.experts[Modality(parts["expert"])]
                return [(_fill(rule.foreign, parts), rule.add_batch_dim)]
            layer = int(parts["layer"]) if parts.get("layer") is not None else None
            present = experts_at(layer) if experts_at is not None and layer is not None else None
            modalities = [m for m in self.experts if present is None or m in present]
            return [(_fill(rule.foreign, {**parts, "expert": self.experts[m]}), rule.add_batch_dim) for m in modalities]
        return [(key, False)]


def _compile(pattern: str, experts: str, choices: dict[str, str], optional_expert: bool = False) -> re.Pattern:
    """A pattern's regex: `{layer}` digits, `{expert}` the layout's expert names (a `.{expert}`
    segment optional where `optional_expert`: a merged native key has none), `{rest}` anything,
    `{name}` one of the choices the rule gives it once as `{name:a|b}`."""
    out, position = [], 0
    for match in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[position : match.start()]))
        name = match.group(1)
        if name == "layer":
            out.append(rf"(?P<layer>{LAYER_INDEX})")
        elif name == "expert":
            out.append(f"(?P<expert>{experts})")
        elif name == "rest":
            out.append(r"(?P<rest>[^.]+(?:\.[^.]+)*)")
        else:
            out.append(f"(?P<{name}>{choices[name]})")
        position = match.end()
    out.append(re.escape(pattern[position:]))
    regex = "".join(out)
    if optional_expert:
        regex = regex.replace(rf"\.(?P<expert>{experts})", rf"(?:\.(?P<expert>{experts}))?")
    return re.compile(regex)


def _fill(pattern: str, parts: dict[str, str | None]) -> str:
    def value(match: re.Match) -> str:
        return parts[match.group(1)]

    return _PLACEHOLDER.sub(value, pattern)


V, L, VL = Modality.V, Modality.L, Modality.VL
_NATIVE_EXPERTS = {V: "v", L: "l", VL: "vl"}

# The paper's (and ViLT's) names differ from ours only by prefixes outside the blocks.
REFERENCE_RULES = (
    KeyRule("blocks.{rest}", "transformer.blocks.{rest}"),
    KeyRule("patch_embed.{rest}", "transformer.patch_embed.{rest}"),
    KeyRule("cls_token", "transformer.cls_token"),
    KeyRule("mask_token", "transformer.mask_token"),
    KeyRule("pos_embed", "transformer.pos_embed"),
    KeyRule("norm.{rest}", "transformer.norm.{rest}"),
    KeyRule("text_embed.word.{rest}", "text_embeddings.word_embeddings.{rest}"),
    KeyRule("text_embed.position.{rest}", "text_embeddings.position_embeddings.{rest}"),
    KeyRule("text_embed.token_type.{rest}", "text_embeddings.token_type_embeddings.{rest}"),
    KeyRule("text_embed.norm.{rest}", "text_embeddings.LayerNorm.{rest}"),
    KeyRule("token_type_embed.{rest}", "token_type_embeddings.{rest}"),
)

VLMO_RULES = (
    KeyRule("blocks.{layer}.norm2.{expert}.{rest}", "transformer.blocks.{layer}.norm2_{expert}.{rest}"),
    KeyRule("blocks.{layer}.mlp.{expert}.{rest}", "transformer.blocks.{layer}.mlp_{expert}.{rest}"),
    *REFERENCE_RULES,
)

_BEIT3_LAYER = "encoder.layers.{layer}"
BEIT3_RULES = (
    KeyRule("text_embed.word.{rest}", "text_embed.{rest}"),
    KeyRule("cls_token", "vision_embed.cls_token"),
    KeyRule("mask_token", "vision_embed.mask_token"),
    KeyRule("patch_embed.proj.{rest}", "vision_embed.proj.{rest}"),
    KeyRule("pos_embed", "encoder.embed_positions.A.weight", add_batch_dim=True),
    KeyRule("text_embed.position.weight", "encoder.embed_positions.B.weight"),
    KeyRule("blocks.{layer}.norm1.{expert}.{rest}", f"{_BEIT3_LAYER}.self_attn_layer_norm.{{expert}}.{{rest}}"),
    KeyRule("blocks.{layer}.attn.{expert}.proj.{rest}", f"{_BEIT3_LAYER}.self_attn.out_proj.{{expert}}.{{rest}}"),
    KeyRule("blocks.{layer}.attn.{expert}.norm.{rest}", f"{_BEIT3_LAYER}.self_attn.inner_attn_ln.{{expert}}.{{rest}}"),
    KeyRule(
        "blocks.{layer}.attn.{expert}.{proj:q_proj|k_proj|v_proj}.{rest}",
        f"{_BEIT3_LAYER}.self_attn.{{proj}}.{{expert}}.{{rest}}",
    ),
    KeyRule("blocks.{layer}.norm2.{expert}.{rest}", f"{_BEIT3_LAYER}.final_layer_norm.{{expert}}.{{rest}}"),
    KeyRule("blocks.{layer}.mlp.{expert}.norm.{rest}", f"{_BEIT3_LAYER}.ffn.{{expert}}.ffn_layernorm.{{rest}}"),
    KeyRule("blocks.{layer}.mlp.{expert}.{rest}", f"{_BEIT3_LAYER}.ffn.{{expert}}.{{rest}}"),
    KeyRule("norm.{expert}.{rest}", "encoder.layer_norm.{expert}.{rest}"),
)

_RELATIVE_POSITIONS_UNUSED = (
    (r"text_embeddings\.position_ids", None),  # arange(max_text_len), a buffer
    (r"(vl_)?(text_|text_imag_)?relative_position_index", None),  # computed from the shapes (models/positions.py)
)

LAYOUTS: dict[Layout, LayoutSpec] = {
    spec.layout: spec
    for spec in (
        LayoutSpec(Layout.NATIVE, (), _NATIVE_EXPERTS, r"blocks\.[0-9]+\.", summary="vlmerge's own names"),
        LayoutSpec(
            Layout.REFERENCE,
            REFERENCE_RULES,
            _NATIVE_EXPERTS,
            r"transformer\.blocks\.[0-9]+\.",
            unused=(
                *_RELATIVE_POSITIONS_UNUSED,
                # the paper's code base also encodes video: its temporal tables never touch an image
                (r"temporal_relative_position_bias_table|mask_for_combining_temporal", None),
                (r"(vl_)?(text_)?(video|temporal)_relative_position_index", None),
            ),
            summary="the paper's released files: transformer.blocks.{i}.attn.{v,l,vl}...",
        ),
        LayoutSpec(
            Layout.VLMO,
            VLMO_RULES,
            {V: "imag", L: "text", VL: "vl"},
            r"transformer\.blocks\.[0-9]+\.(mlp|norm2)_(imag|text|vl)\.",
            unused=_RELATIVE_POSITIONS_UNUSED,
            summary="microsoft/unilm VLMo: shared attention, mlp_imag|mlp_text|mlp_vl, norm2_*",
        ),
        LayoutSpec(
            Layout.BEIT3,
            BEIT3_RULES,
            {V: "A", L: "B"},
            r"(beit3\.)?encoder\.layers\.[0-9]+\.",
            prefixes=("beit3.", ""),
            summary="torchscale BEiT3: encoder.layers.{i}.self_attn.q_proj.{A,B}..., optionally under beit3.",
        ),
    )
}


@dataclass(frozen=True)
class KeyMapping:
    """How a file's keys map to native ones: native key -> (stored key, gains a batch dimension)."""

    layout: Layout
    prefix: str  # the wrapper the file's model sits under ("" or "beit3.")
    stored: dict[str, tuple[str, bool]]
    unused: frozenset[str]  # native keys the family's forward never reads (buffers, video tables)

    def stored_keys(self) -> list[str]:
        return [stored for stored, _ in self.stored.values()]


def detect_layout(keys: Iterable[str]) -> Layout:
    """The layout whose signature the keys show; one named error if none or several do.

    VLMo's keys are a special case of the paper's prefixes, so a file that shows VLMo's expert names
    is VLMo's; a file without any block (a head, a table) is native."""
    keys = list(keys)
    found = [spec.layout for spec in LAYOUTS.values() if any(re.match(spec.signature, key) for key in keys)]
    if Layout.VLMO in found:
        found.remove(Layout.REFERENCE)
    if len(found) == 1:
        return found[0]
    if not found:
        if not any("blocks." in key or "layers." in key for key in keys):
            return Layout.NATIVE
        raise CheckpointError(f"no known layout fits these keys (e.g. {keys[0]!r}); {describe_layouts()}")
    raise CheckpointError(
        f"the keys fit several layouts ({', '.join(layout.value for layout in found)}); "
        f"pass --input-layout to choose; {describe_layouts()}"
    )


def describe_layouts() -> str:
    return "layouts: " + "; ".join(f"{spec.layout.value} ({spec.summary})" for spec in LAYOUTS.values())


def layout_reason(keys: Iterable[str], layout: Layout) -> str:
    """Why a file was read in `layout`: the first key that shows its signature (`vlmerge inspect`)."""
    spec = LAYOUTS[layout]
    example = next((key for key in keys if re.match(spec.signature, key)), None)
    return f"key {example!r} matches {layout.value}'s pattern {spec.signature!r}" if example else "no blocks"


def map_keys(keys: Sequence[str], layout: Layout | None = None) -> KeyMapping:
    """Native names of a file's keys, in `layout` or the detected one; refuses two keys that would
    become one (a file mixing layouts)."""
    _check_numbers(keys)
    layout = Layout(layout) if layout is not None else detect_layout(keys)
    spec = LAYOUTS[layout]
    prefix = next((p for p in spec.prefixes if p and any(k.startswith(p) for k in keys)), "")
    stored: dict[str, tuple[str, bool]] = {}
    unused = set()
    inner_keys = {key[len(prefix) :] if prefix and key.startswith(prefix) else key for key in keys}
    for key in keys:
        inner = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        native, add_batch_dim = spec.to_native(inner)
        if spec.is_unused(inner, inner_keys):
            unused.add(native)
        if native in stored:
            raise CheckpointError(
                f"keys {stored[native][0]!r} and {key!r} both map to {native!r}; the file mixes layouts"
            )
        stored[native] = (key, add_batch_dim)
    if layout is not Layout.NATIVE:
        _check_all_renamed(stored, layout)
    return KeyMapping(layout, prefix, stored, frozenset(unused))


MAX_KEY_DIGITS = 64  # any number in a key; plans sort keys by their numbers, and int() refuses over 4300 digits
_LAYER_POSITION = re.compile(r"(?:^|\.)(?:blocks|layers)\.([0-9]+)(?=\.|\Z)")
_NUMBER = re.compile(r"[0-9]+")


def _check_numbers(keys: Iterable[str]) -> None:
    """One named error for a key whose layer index, or any number, is too long to be one."""
    for key in keys:
        shown = repr(key) if len(key) <= 60 else repr(key[:57] + "...")
        layer = max(map(len, _LAYER_POSITION.findall(key)), default=0)
        if layer > MAX_LAYER_DIGITS:
            raise CheckpointError(f"key {shown} holds a layer index of {layer} digits; at most {MAX_LAYER_DIGITS}")
        number = max(map(len, _NUMBER.findall(key)), default=0)
        if number > MAX_KEY_DIGITS:
            raise CheckpointError(f"key {shown} holds a number of {number} digits; at most {MAX_KEY_DIGITS}")


def _check_all_renamed(stored: dict[str, tuple[str, bool]], layout: Layout) -> None:
    """A forced layout that leaves a key shaped like another layout's blocks is the wrong one."""
    native_blocks = LAYOUTS[Layout.NATIVE].signature
    for native, (key, _) in stored.items():
        if native == key and not re.match(native_blocks, native) and re.search(r"(^|\.)(blocks|layers)\.[0-9]+\.", key):
            raise CheckpointError(f"key {key!r} is not in the {layout.value} layout; {describe_layouts()}")


def foreign_keys(
    native_key: str,
    layout: Layout,
    prefix: str = "",
    experts_at: Callable[[int], Iterable[Modality] | None] | None = None,
) -> list[tuple[str, bool]]:
    """The keys (under `prefix`) a native tensor is written as in `layout`, each with whether its
    batch dimension is dropped; a merged tensor of a multiway layout is written under each expert."""
    spec = LAYOUTS[Layout(layout)]
    return [(prefix + key, squeeze) for key, squeeze in spec.to_foreign(native_key, experts_at)]


def to_layout(tensor: torch.Tensor, drop_batch_dim: bool) -> torch.Tensor:
    return tensor.squeeze(0) if drop_batch_dim else tensor


def to_reference_key(native_key: str) -> str:
    """The paper's name of a native key."""
    ((key, _),) = LAYOUTS[Layout.REFERENCE].to_foreign(native_key)
    return key


def from_reference_key(reference_key: str) -> str:
    return LAYOUTS[Layout.REFERENCE].to_native(reference_key)[0]


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
