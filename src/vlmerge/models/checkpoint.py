"""Model <-> checkpoint: weights with their config (and step) in one safetensors file.

A checkpoint may also carry heads (pre-training projections, a task head) under their own
key prefix, listed in the metadata under "heads", and the tokenizer as JSON under
"tokenizer": a merged checkpoint keeps both, so it can be evaluated without its parents.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vlmerge.core.errors import CheckpointError
from vlmerge.io.checkpoint import CheckpointReader, open_checkpoint, save_checkpoint
from vlmerge.models.config import ModelConfig
from vlmerge.models.families import checkpoint_config
from vlmerge.models.transformer import VLTransformer


def save_model(
    model: VLTransformer,
    path: str | os.PathLike,
    step: int | None = None,
    extra_metadata: dict[str, str] | None = None,
    heads: Mapping[str, nn.Module] | None = None,
) -> Path:
    heads = dict(heads or {})
    state = dict(model.state_dict())
    for name, head in heads.items():
        state.update({f"{name}.{key}": value for key, value in head.state_dict().items()})
    metadata = {"format": "vlmerge", "config": model.config.model_dump_json(), **(extra_metadata or {})}
    if heads:
        metadata["heads"] = json.dumps(sorted(heads))
    if step is not None:
        metadata["step"] = str(step)
    return save_checkpoint(path, state, metadata)


def head_names(reader: CheckpointReader) -> list[str]:
    try:
        return list(json.loads(reader.metadata.get("heads", "[]")))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{reader.path}: metadata 'heads' is not valid JSON ({error})") from error


def load_model(
    path: str | os.PathLike, layout: str | None = None, overrides: Mapping[str, object] | None = None
) -> VLTransformer:
    """Build the model its config describes (or, for a released VLMo, BEiT-3 or paper file, the one
    its layout and shapes give, `overrides` apart) and load the backbone weights strictly (heads apart)."""
    reader = open_checkpoint(path, layout)
    config = checkpoint_config(reader, overrides)
    if config is None:
        raise CheckpointError(f"{path}: no model config in the checkpoint metadata; cannot build the model")
    return model_from_reader(reader, config)


def model_from_reader(reader: CheckpointReader, config: ModelConfig) -> VLTransformer:
    """The model `config` describes with its backbone weights read from the open `reader`, strictly
    (heads apart): for a caller that also hashes or checks that same opening."""
    model = VLTransformer(config)
    head_prefixes = tuple(f"{name}." for name in head_names(reader))
    unused = reader.mapping.unused  # what the family stores but never reads (index buffers, video tables)
    backbone = [
        key for key in reader.keys if not (head_prefixes and key.startswith(head_prefixes)) and key not in unused
    ]
    expected, found = set(model.state_dict()), set(backbone)
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(
            f"{reader.path}: weights do not fit the config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
            f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    model.load_state_dict({key: reader.get(key) for key in backbone}, strict=True)
    return model


def load_head_state(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor] | None:
    """The weights of head `name` stored in the checkpoint, or None when it has none."""
    reader = open_checkpoint(path)
    if name not in head_names(reader):
        return None
    prefix = f"{name}."
    return {key[len(prefix) :]: reader.get(key) for key in reader.keys if key.startswith(prefix)}
