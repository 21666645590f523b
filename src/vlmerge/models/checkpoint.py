"""Model <-> checkpoint: weights with their config (and step) in one safetensors file."""

import json
import os
from pathlib import Path

from vlmerge.core.errors import CheckpointError
from vlmerge.io.checkpoint import open_checkpoint, save_checkpoint
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer


def save_model(model: VLTransformer, path: str | os.PathLike, step: int | None = None,
               extra_metadata: dict[str, str] | None = None) -> Path:
    metadata = {"format": "vlmerge", "config": model.config.model_dump_json(), **(extra_metadata or {})}
    if step is not None:
        metadata["step"] = str(step)
    return save_checkpoint(path, model.state_dict(), metadata)


def load_model(path: str | os.PathLike) -> VLTransformer:
    """Build the model its config describes and load the weights strictly."""
    reader = open_checkpoint(path)
    if reader.config is None:
        raise CheckpointError(f"{path}: no model config in the checkpoint metadata; cannot build the model")
    model = VLTransformer(ModelConfig.parse(reader.config, where=f"{path} config"))
    expected, found = set(model.state_dict()), set(reader.keys)
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(f"{path}: weights do not fit the config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                              f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    model.load_state_dict(reader.state_dict(), strict=True)
    return model
