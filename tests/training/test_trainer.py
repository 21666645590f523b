"""The trainer: a run killed with SIGKILL and resumed ends with the same weights as one never killed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from train_script import CAPTIONS

from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.training.config import OptimizerConfig
from vlmerge.training.setup import make_optimizer
from vlmerge.training.trainer import CHECKPOINT, METRICS, batch_indices, read_metrics

SCRIPT = Path(__file__).parent / "train_script.py"
STEPS = 12


def run(run_dir: Path, delay: float = 0.0) -> subprocess.Popen:
    tokenizer = run_dir.parent / "tokenizer.json"
    if not tokenizer.exists():
        TextTokenizer.train(CAPTIONS, vocab_size=64).save(tokenizer)
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(STEPS), str(tokenizer), str(delay)])


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, weights_only=True)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run(reference).wait(timeout=120) == 0

    process = run(killed, delay=0.15)
    deadline = time.time() + 120
    while len(read_metrics(killed)) < 5 and time.time() < deadline:  # past the first checkpoint (step 3)
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = len(read_metrics(killed))
    assert 0 < interrupted_at < STEPS
    assert run(killed).wait(timeout=120) == 0

    expected, got = final_state(reference), final_state(killed)
    assert got["step"] == expected["step"] == STEPS
    for module in expected["modules"]:
        for key, value in expected["modules"][module].items():
            assert torch.equal(got["modules"][module][key], value), f"{module}.{key}"
    steps = [record["step"] for record in read_metrics(killed)]
    assert steps == list(range(STEPS))  # metrics logged after the checkpoint were not duplicated
    assert [r["loss"] for r in read_metrics(killed)] == [r["loss"] for r in read_metrics(reference)]


def test_a_crash_mid_line_does_not_break_resume(tmp_path):
    (tmp_path / METRICS).write_text(json.dumps({"step": 0, "loss": 1.0}) + '\n{"step": 1, "lo')
    from vlmerge.training.trainer import Trainer

    model = torch.nn.Linear(2, 2)
    trainer = Trainer(
        tmp_path,
        {"model": model},
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=1,
        checkpoint_every=1,
        progress=False,
    )
    assert trainer.resume() == 0 and read_metrics(tmp_path) == []


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    batches = [batch_indices(10, 5, step, seed=3) for step in range(4)]
    assert sorted(torch.cat(batches[:2]).tolist()) == list(range(10))
    assert torch.equal(batches[2], batch_indices(10, 5, 2, seed=3))
    assert not torch.equal(batches[0], batches[2]) or not torch.equal(batches[1], batches[3])


def test_optimizer_groups_decay_matrices_only_and_the_task_head_learns_faster():
    model, head = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Linear(4, 2)
    config = OptimizerConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2, head_lr_multiplier=10)
    optimizer, scheduler = make_optimizer([model], config, steps=10, head=head)
    groups = [(len(g["params"]), g["weight_decay"], g["initial_lr"]) for g in optimizer.param_groups]
    assert groups == [(1, 0.1, 1e-3), (3, 0.0, 1e-3), (1, 0.1, 1e-2), (1, 0.0, 1e-2)]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-4, 5e-3, 5e-3])  # warm-up step 1 of 2
