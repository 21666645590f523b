"""Training under torchrun with DistributedDataParallel (2 gloo processes on CPU) ends with the
same weights as one process on the same global batches: seed pre-training (every objective,
contrastive over gathered features, masks and hard negatives drawn for the global batch) and
fine-tuning."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from ddp_stage_script import DATA, FINETUNE_TASKS

from vlmerge.data.datasets.emoji.dataset import build_emoji_dataset
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.training.trainer import read_metrics

SCRIPT = Path(__file__).parent / "ddp_stage_script.py"


def launch(processes: int, out: Path, tokenizer: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        str(out),
        str(tokenizer),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(emoji_sources, tmp_path):
    train = build_emoji_dataset(DATA["image_size"], limit=DATA["limit"]).split("train")
    tokenizer = TextTokenizer.train([train.caption(i) for i in range(len(train))], vocab_size=300)
    tokenizer.save(tmp_path / "tokenizer.json")
    launch(1, tmp_path / "one", tmp_path / "tokenizer.json")
    launch(2, tmp_path / "two", tmp_path / "tokenizer.json")
    for run in ("seed", *FINETUNE_TASKS):
        one = open_checkpoint(tmp_path / "one" / run / "model.safetensors")
        two = open_checkpoint(tmp_path / "two" / run / "model.safetensors")
        start = open_checkpoint(tmp_path / "one" / "seed" / "model.safetensors") if run != "seed" else None
        assert one.keys == two.keys
        moved = 0.0
        for key in one.keys:
            torch.testing.assert_close(two.get(key), one.get(key), rtol=1e-4, atol=1e-5, msg=f"{run}: {key}")
            if start is not None and key in start:
                moved = max(moved, (one.get(key) - start.get(key)).abs().max().item())
        assert start is None or moved > 1e-3  # training moved the weights 100x beyond the tolerance
        logged_one, logged_two = read_metrics(tmp_path / "one" / run), read_metrics(tmp_path / "two" / run)
        assert [r["loss"] for r in logged_two] == pytest.approx([r["loss"] for r in logged_one], rel=1e-4)
