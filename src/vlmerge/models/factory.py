"""Model sizes as data (sizes.json) feeding one factory."""

import json
from importlib import resources
from typing import Any

from torch import nn

from vlmerge.core.registry import Registry
from vlmerge.models.config import ExpertPlacement, ModelConfig
from vlmerge.models.families import FAMILY_OPTIONS
from vlmerge.models.transformer import VLTransformer

MODEL_SIZES: Registry[dict[str, Any]] = Registry("model size")
for _name, _fields in json.loads(resources.files("vlmerge.models").joinpath("sizes.json").read_text()).items():
    MODEL_SIZES.add(_name, _fields)


def model_config(size: str, **overrides: Any) -> ModelConfig:
    """The registered config for `size` (a family's sizes on top of its options), with any field
    overridden (validated)."""
    fields = {**MODEL_SIZES.get(size), **overrides}
    family = FAMILY_OPTIONS.get(fields.get("family", "native"), {})
    return ModelConfig.parse({**family, **fields}, where=f"model size {size!r}")


def create_model(config: ModelConfig | str, **overrides: Any) -> VLTransformer:
    if isinstance(config, str):
        config = model_config(config, **overrides)
    return VLTransformer(config)


def count_parameters(model: nn.Module, backbone_only: bool = False) -> int:
    """All parameters, or only those in the transformer blocks (the paper's "backbone")."""
    params = model.blocks.parameters() if backbone_only else model.parameters()
    return sum(p.numel() for p in params)


__all__ = ["ExpertPlacement", "MODEL_SIZES", "ModelConfig", "count_parameters", "create_model", "model_config"]


def state_keys(config: ModelConfig) -> list[str]:
    """The state-dict keys of the model `config` describes. Names depend on depth, experts and
    the fusion layer but not on widths or sizes, so a miniature of the model is built: tens of
    milliseconds at any size, where the meta device costs a second of torch imports."""
    miniature = config.model_copy(
        update={"width": 2 * config.heads, "image_size": config.patch_size, "vocab_size": 2, "max_text_len": 2}
    )
    return list(VLTransformer(miniature).state_dict())
