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
from vlmerge.training.trainer import CHECKPOINT, METRICS, Trainer, batch_indices, read_metrics

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


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_updates_give_the_bytes_of_torchs_per_parameter_loop(name):
    """make_optimizer runs the update as foreach kernels (and the trainer clips with them): the same
    bytes as the per-parameter loop that torch uses on the CPU by default, so runs keep their numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    twin = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    twin.load_state_dict(model.state_dict())
    config = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1, warmup_steps=2)
    optimizer, scheduler = make_optimizer([model], config, steps=6)
    names = {id(p): n for n, p in model.named_parameters()}
    twins = dict(twin.named_parameters())
    loop_groups = [
        {**g, "params": [twins[names[id(p)]] for p in g["params"]], "foreach": False} for g in optimizer.param_groups
    ]
    loop = (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)(loop_groups)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        inputs = torch.randn(4, 5, generator=generator)
        for net, opt, foreach in ((model, optimizer, True), (twin, loop, False)):
            opt.zero_grad()
            net(inputs).pow(2).sum().backward()
            nn.utils.clip_grad_norm_(net.parameters(), 0.5, foreach=foreach)
            opt.step()
        scheduler.step()
        for group in loop.param_groups:
            group["lr"] = optimizer.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_a_resumed_run_keeps_its_own_update_kernels_over_the_checkpoints(tmp_path):
    """A checkpoint records its writer's foreach setting; resuming takes its state, not that setting."""

    def trainer(foreach: bool | None, steps: int) -> Trainer:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=foreach)
        return Trainer(tmp_path, {"model": model}, optimizer, steps, checkpoint_every=1, progress=False)

    old = trainer(None, 2)
    old.fit(lambda step: {"loss": old.modules["model"](torch.ones(1, 3)).sum()})
    new = trainer(True, 3)
    assert new.resume() == 2
    assert new.optimizer.param_groups[0]["foreach"] is True
    assert new.optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
