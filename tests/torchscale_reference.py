"""torchscale's own BEiT3, the reference the BEiT-3 tests compare against.

torchscale==0.3.0 and fairscale==0.4.0 install with --no-deps beside the pinned torch (the
Makefile does). torchscale imports timm only for `drop_path`, the identity in eval mode; timm
itself pulls a CUDA torch, so where it is absent that one function is provided here. Under CI
a missing torchscale fails the tests instead of skipping them.
"""

import os
import sys
import types

import pytest
import torch


def _provide_drop_path() -> None:
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        layers = types.ModuleType("timm.models.layers")
        layers.drop_path = lambda x, drop_prob=0.0, training=False: x  # eval mode: the identity
        sys.modules.update(
            {
                "timm": types.ModuleType("timm"),
                "timm.models": types.ModuleType("timm.models"),
                "timm.models.layers": layers,
            }
        )


def beit3_class():
    """(EncoderConfig, BEiT3) from torchscale; a skip where it is absent, a failure under CI."""
    _provide_drop_path()
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    except ImportError as error:
        if os.environ.get("CI"):
            pytest.fail(f"torchscale is not installed ({error}); CI installs torchscale==0.3.0 fairscale==0.4.0")
        pytest.skip(f"torchscale not installed ({error})")
    return EncoderConfig, BEiT3


# What unilm's beit3 passes torchscale for every size (modeling_utils._get_base_config).
BEIT3_OPTIONS = dict(multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True)
TEST_SIZES = dict(
    img_size=32,
    patch_size=8,
    vocab_size=100,
    encoder_embed_dim=128,
    encoder_attention_heads=2,
    encoder_ffn_embed_dim=256,
    encoder_layers=3,
    max_source_positions=34,
)


def beit3_config(**sizes):
    """torchscale's EncoderConfig of a BEiT-3 of `sizes` (EncoderConfig's names and defaults)."""
    EncoderConfig, _ = beit3_class()
    return EncoderConfig(**BEIT3_OPTIONS, **sizes)


def random_beit3(seed: int = 0, **sizes):
    """A test-sized torchscale BEiT3 in eval mode, every parameter moved off its initial value (norms
    and biases too, which start at 1 and 0), so every tensor's mapping matters."""
    _, BEiT3 = beit3_class()
    config = beit3_config(**{**TEST_SIZES, **sizes})
    torch.manual_seed(seed)
    model = BEiT3(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model, config
