"""Model sizes as data (sizes.json) feeding one factory."""

import functools
import json
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


__all__ = [
    "ExpertPlacement",
    "MODEL_SIZES",
    "ModelConfig",
    "count_parameters",
    "create_model",
    "model_config",
    "state_keys",
    "state_shapes",
]


def state_keys(config: ModelConfig) -> list[str]:
    """The state-dict keys of the model `config` describes. Names depend on depth, experts and
    the fusion layer but not on widths or sizes, so a miniature of the model is built: tens of
    milliseconds at any size, where the meta device costs a second of torch imports."""
    miniature = config.model_copy(
        update={"width": 2 * config.heads, "image_size": config.patch_size, "vocab_size": 2, "max_text_len": 2}
    )
    return list(VLTransformer(miniature).state_dict())


@functools.lru_cache(maxsize=16)
def state_shapes(config: ModelConfig) -> Mapping[str, tuple[int, ...]]:
    """Every state-dict key of the model `config` describes with its shape, in `state_dict` order,
    so a file can be checked against the model before any tensor is read. Built on the meta device
    (no memory) with the initialisers skipped (their meta kernels cost a second of imports); kept per
    config (read-only), since one merge asks for it while checking and again for its record."""
    with torch.device("meta"), _SkipInPlace():
        model = VLTransformer(config)
    return MappingProxyType({key: tuple(value.shape) for key, value in model.state_dict().items()})


class _SkipInPlace(TorchFunctionMode):
    """Turns every in-place op (an initialiser's `uniform_`, `normal_`, `erfinv_`...) into a no-op:
    on meta tensors they compute nothing anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return args[0] if args else next(iter(kwargs.values()))
        return func(*args, **kwargs)
