import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as paper_oracle

from vlmerge.models import VLTransformer, model_config  # noqa: E402

# Property tests draw the same examples on every run (a suite that passes passes again, wherever it runs);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for the cases no run has tried yet.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def micro_config():
    return model_config("micro", layer_scale_init=1.0)


@pytest.fixture
def specific_model(micro_config):
    torch.manual_seed(0)
    return VLTransformer(micro_config)


def make_inputs(config, batch: int = 2, text_len: int = 6, seed: int = 0) -> dict:
    """Synthetic images and padded text that exercise every route."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, config.channels, config.image_size, config.image_size, generator=generator)
    ids = torch.randint(1, config.vocab_size, (batch, text_len), generator=generator)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, text_len // 2 :] = False
    return {"images": images, "text_ids": ids, "text_mask": mask}


ROUTES = {
    "image": lambda x: {"images": x["images"]},
    "text": lambda x: {"text_ids": x["text_ids"], "text_mask": x["text_mask"]},
    "pair": lambda x: x,
}


@pytest.fixture(scope="session")
def emoji_sources():
    """The Debian files the emoji dataset is built from; tests that need them skip without them."""
    from vlmerge.data.datasets.emoji.records import EmojiSources

    found = EmojiSources.default()
    missing = [str(path) for path in found.files() if not path.is_file()]
    if missing:
        pytest.skip(
            f"Debian emoji sources absent ({', '.join(missing)}); "
            "apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data"
        )
    return found


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (fixed ports collide with leftovers)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
