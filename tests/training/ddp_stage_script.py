"""Seed pre-training then fine-tuning under torchrun, for the DDP equivalence test:
torchrun --nproc_per_node N ddp_stage_script.py OUT_DIR TOKENIZER_JSON."""

import sys

import torch

from vlmerge.tasks.finetune import run_finetune
from vlmerge.training.config import parse_stage_config
from vlmerge.training.distributed import init_distributed
from vlmerge.training.pretrain import run_pretraining

DATA = {"image_size": 32, "limit": 400}
# SGD: weights move linearly with the gradients, so a gradient that differs shows (Adam would
# hide a wrong scale and amplify rounding in near-zero gradients).
OPTIMIZER = {"name": "sgd", "batch_size": 8, "lr": 0.5, "warmup_steps": 0, "grad_clip": None}
FINETUNE_TASKS = ("retrieval", "classify_image")  # contrastive over gathered features; unused text parameters


def main(out: str, tokenizer: str) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    seed_config = parse_stage_config(
        "seed",
        {"steps": 3, "checkpoint_every": 2, "data": DATA, "optimizer": OPTIMIZER, "tokenizer": {"path": tokenizer}},
    )
    seed = run_pretraining(seed_config, f"{out}/seed", progress=False, dist=dist)
    for task in FINETUNE_TASKS:
        config = parse_stage_config(
            "finetune", {"task": task, "init": str(seed), "steps": 3, "data": DATA, "optimizer": OPTIMIZER}
        )
        run_finetune(config, f"{out}/{task}", progress=False, dist=dist)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
