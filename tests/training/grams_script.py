"""Gram collection over a data shard per process: torchrun --nproc_per_node N grams_script.py OUT."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vlmerge.merging.grams import collect_grams
from vlmerge.models import VLTransformer, model_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers
from conftest import make_inputs  # noqa: E402

BATCHES = 4


def all_batches(config) -> list[dict]:
    """Pairs, plus one image-only batch that only rank 1 sees (its v experts above the fusion
    layer get tokens on one rank only)."""
    pairs = [make_inputs(config, batch=2, seed=seed) for seed in range(BATCHES)]
    return pairs[:3] + [{"images": pairs[3]["images"]}]


def model():
    torch.manual_seed(0)
    return VLTransformer(model_config("micro"))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    shard = all_batches(net.config)[rank::world]
    grams, info = collect_grams(net, shard)  # all-reduced inside
    if rank == 0:
        torch.save({"grams": grams, "tokens": {k: v["tokens"] for k, v in info.items()}}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
