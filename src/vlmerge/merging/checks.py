"""The merge's input checks that names, shapes, dtypes and metadata alone settle, before any tensor is read.

Each refuses one problem with one named error: an output layout of another family, a config the
source's shapes do not give, tensors missing from, foreign to or shaped otherwise than the model the
config describes, experts that are not floating point or differ in dtype, a seed checkpoint or
statistics that do not fit, a tokenizer that is not one. The statistics' own checks are in
`statistics_checks`.
"""

from collections.abc import Iterable, Mapping, Sequence
from difflib import get_close_matches
from typing import Any

import torch

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import CheckpointError, ConfigError, MergeError
from vlmerge.io.checkpoint import CheckpointReader
from vlmerge.io.grams import GramSet
from vlmerge.io.layout import Layout, foreign_keys
from vlmerge.io.statistics import FisherSet
from vlmerge.merging.fisher import validate_fisher
from vlmerge.merging.plan import MERGE_DTYPES, MergePlan
from vlmerge.merging.registry import MergeMethod, Statistics
from vlmerge.merging.statistics_checks import validate_grams
from vlmerge.models.checkpoint import head_names
from vlmerge.models.config import ModelConfig
from vlmerge.models.factory import state_shapes
from vlmerge.models.families import FAMILIES, checkpoint_config, layout_family

MORE_EXAMPLES = 3  # tensors an error names after the first one, before it only counts the rest


def check_output_layout(reader: CheckpointReader, layout: Layout | str) -> None:
    """`refuse_foreign_layout` for a caller that has no config of the source yet: reads it (a config
    that needs overrides counts as none: the layout's own family decides)."""
    try:
        config = checkpoint_config(reader)
    except (CheckpointError, ConfigError):
        config = None
    refuse_foreign_layout(reader, config, layout)


def refuse_foreign_layout(reader: CheckpointReader, config: ModelConfig | None, layout: Layout | str) -> None:
    """Refuse, before any work, an output layout whose family is not the source's: BEiT-3's separate
    projections under VLMo's names would be a file no VLMo code can load."""
    layout = Layout(layout)
    family = FAMILIES.get(config.family) if config is not None else layout_family(reader.layout)
    allowed_layouts = dict.fromkeys((*family.output_layouts, reader.layout))  # its own layout, always
    if layout not in allowed_layouts:
        allowed = ", ".join(item.value for item in allowed_layouts)
        raise MergeError(
            f"{reader.path}: a {family.name} model cannot be written in the {layout.value} layout, which names "
            f"another family's modules; write it as {allowed}"
        )


def merge_config(reader: CheckpointReader, overrides: Mapping[str, Any] | None = None) -> ModelConfig | None:
    """The source's model config: stored, or read from a released file's shapes, `overrides` on top.
    A released file whose shapes do not give one is refused here (its message says what to give): its
    merge would carry no config, and no later stage could load it. None for a native file without one."""
    for name in ("image_size", "heads"):  # sizes the model's own checks let through at zero or below
        value = (overrides or {}).get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    config = checkpoint_config(reader, overrides)
    if config is None and overrides:
        given = ", ".join(sorted(overrides))
        raise MergeError(
            f"{reader.path}: carries no model config and its shapes give none, so there is nothing to set "
            f"{given} in; merge it without them"
        )
    return config


def validate_carried_metadata(reader: CheckpointReader) -> None:
    """A tokenizer the merge would copy into its output (CARRIED_METADATA) must be one, or the merged
    checkpoint would carry it on to every later stage. (Opening the file checked that it is a JSON
    object and that `heads` is a list of names.)"""
    if "tokenizer" in reader.metadata:
        from tokenizers import Tokenizer  # imported here: only merges of checkpoints with a tokenizer need it

        try:
            Tokenizer.from_str(reader.metadata["tokenizer"])
        except Exception as error:  # tokenizers raises its own exception type
            detail = " ".join(str(error).split())
            raise CheckpointError(
                f"{reader.path}: metadata 'tokenizer' is not a serialised tokenizer ({detail}); "
                "the merge would carry it into its output"
            ) from None


def validate_layout(reader: CheckpointReader, config: ModelConfig | None) -> None:
    """Every tensor of the model `config` describes must be there with its shape, and nothing else but
    heads and what the family stores unread, or the merged checkpoint would not load strictly
    (`vlmerge evaluate`, `export-hf`). Names and shapes only: built on the meta device."""
    if config is None:
        return
    expected = state_shapes(config)
    backbone = backbone_keys(reader, expected)
    unknown = [key for key in backbone if key not in expected]
    if unknown:
        close = get_close_matches(unknown[0], list(expected), n=1)
        hint = f"; did you mean {_stored_name(reader, close[0])!r}?" if close else ""
        raise CheckpointError(
            f"{reader.path}: unknown tensor {_stored_name(reader, unknown[0])!r}, not part of the model its "
            f"config describes{hint}{_more(reader, unknown, 'unknown')}"
        )
    missing = [key for key in expected if key not in reader]
    if missing:
        raise CheckpointError(
            f"{reader.path}: missing tensor {_stored_name(reader, missing[0])!r}, which the model its config "
            f"describes needs{_more(reader, missing, 'missing')}"
        )
    misshapen = [key for key in expected if tuple(reader.shape(key)) != expected[key]]
    if misshapen:
        key = misshapen[0]
        raise CheckpointError(
            f"{reader.path}: tensor {_stored_name(reader, key)!r} has shape {_stored_shape(reader, key)}, but the "
            f"model its config describes has {_stored_shape(reader, key, expected[key])}"
            f"{_more(reader, misshapen, 'of another shape')}"
        )


def backbone_keys(reader: CheckpointReader, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The source's keys that must be the model's: all but its heads (a native file names them in its
    metadata; in a released file they are the keys its layout does not rename that lie outside the
    model's modules, such as `itm_score.*`) and what its family stores but never reads (index buffers)."""
    heads = tuple(f"{name}." for name in head_names(reader))
    modules = {key.split(".")[0] for key in expected}
    released = reader.layout is not Layout.NATIVE

    def is_head(key: str) -> bool:
        if heads and key.startswith(heads):
            return True
        renamed = reader.mapping.stored[key][0] != key
        return released and not renamed and key.split(".")[0] not in modules

    return [key for key in reader.keys if key not in reader.mapping.unused and not is_head(key)]


def _stored_name(reader: CheckpointReader, key: str) -> str:
    """A native key as the source's file names it (its layout's name where the file lacks it)."""
    if key in reader:
        return reader.mapping.stored[key][0]
    return foreign_keys(key, reader.layout, reader.mapping.prefix)[0][0]


def _stored_shape(reader: CheckpointReader, key: str, shape: tuple[int, ...] | None = None) -> list[int]:
    """A native shape (the source's own where None) as the source's file stores it."""
    shape = tuple(reader.shape(key)) if shape is None else shape
    batched = key in reader and reader.mapping.stored[key][1]
    return list(shape[1:] if batched else shape)


def _more(reader: CheckpointReader, keys: Sequence[str], what: str) -> str:
    """` (N more <what>: a, b, c, ...)` after the first of `keys`; empty when it is the only one."""
    if len(keys) < 2:
        return ""
    named = ", ".join(_stored_name(reader, key) for key in keys[1 : 1 + MORE_EXAMPLES])
    return f" ({len(keys) - 1} more {what}: {named}{', ...' if len(keys) > 1 + MORE_EXAMPLES else ''})"


def validate_inputs(
    plan: MergePlan,
    method: MergeMethod,
    origin: CheckpointReader | None,
    grams: GramSet | None,
    fisher: FisherSet | None = None,
    options: Iterable[StrictConfig] = (),
) -> None:
    """What the method reads beside the experts is there and fits. `options`: those of the merged
    tensors, for a method that checks how its statistics were collected."""
    _validate_expert_count(plan, method)
    if method.needs_origin:
        _validate_origin(plan, method, origin)
    if method.needs_grams:
        if grams is None:
            raise MergeError(f"method {method.name!r} needs Gram matrices (--grams)")
        validate_grams(plan, grams)
    if method.statistics is Statistics.FISHER:
        if fisher is None:
            raise MergeError(f"method {method.name!r} needs Fisher statistics (--fisher)")
        validate_fisher(plan, fisher)
    if method.check_statistics is not None:  # collected the way this merge needs, with every tensor's options?
        distinct = {each.model_dump_json(): each for each in options}
        for each in distinct.values():
            method.check_statistics(grams if method.needs_grams else fisher, each, plan.selection.value)


def _validate_expert_count(plan: MergePlan, method: MergeMethod) -> None:
    """No merged tensor has more experts than the method takes (its first such tensor is named)."""
    if method.max_experts is None:
        return
    over = [g for g in plan.groups if len(g.experts) > method.max_experts]
    if over:
        raise MergeError(
            f"method {method.name!r} takes at most {method.max_experts} experts, but {over[0].target} "
            f"(and {len(over) - 1} more tensors) has {len(over[0].experts)} with --experts {plan.selection.value}; "
            "choose an expert selection with fewer (retrieval, vqa, nlvr2) or another method"
        )


def _validate_origin(plan: MergePlan, method: MergeMethod, origin: CheckpointReader | None) -> None:
    """The seed checkpoint holds every merged tensor, shaped as its experts."""
    if origin is None:
        raise MergeError(f"method {method.name!r} needs the seed checkpoint as origin (--seed-checkpoint)")
    for group in plan.groups:
        if group.target not in origin:
            raise MergeError(f"seed checkpoint {origin.path} has no tensor {group.target}")
        if tuple(origin.shape(group.target)) != group.shape:
            raise MergeError(
                f"seed checkpoint {group.target} has shape {list(origin.shape(group.target))}, "
                f"experts have {list(group.shape)}"
            )


def validate_dtypes(plan: MergePlan, reader: CheckpointReader, origin: CheckpointReader | None = None) -> None:
    """Every merged tensor is floating point (`MERGE_DTYPES`): an integer or boolean expert would be
    truncated by the cast back, a complex one averaged into NaN, unseen by the finiteness check. The
    experts of a tensor share one dtype: casting them all to the first one's would merge a float32
    expert at float16 precision without a word. `origin`: the seed checkpoint a method reads."""
    for group in plan.groups:
        dtypes = {m: reader.dtype(e.key) for m, e in group.experts.items()}
        for modality, dtype in dtypes.items():
            _check_merge_dtype(reader, group.experts[modality].key, dtype, "expert tensor")
        if len(set(dtypes.values())) > 1:
            detail = ", ".join(f"{m.value} {str(d).removeprefix('torch.')}" for m, d in dtypes.items())
            raise MergeError(f"experts of {group.target} differ in dtype: {detail}; cast the checkpoint to one dtype")
        if origin is not None and group.target in origin:
            _check_merge_dtype(origin, group.target, origin.dtype(group.target), "seed checkpoint tensor")


def _check_merge_dtype(reader: CheckpointReader, key: str, dtype: torch.dtype, what: str) -> None:
    if dtype not in MERGE_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in MERGE_DTYPES)
        raise MergeError(
            f"{reader.path}: {what} {_stored_name(reader, key)} is {str(dtype).removeprefix('torch.')}; "
            f"a merge needs floating point ({allowed})"
        )
