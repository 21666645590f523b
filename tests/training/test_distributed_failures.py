"""Training runs that must stop rather than go on wrong or wait forever: a check that fails on one
process of a two-process (gloo) job ends every process, non-zero, with the error printed once; a run
directory whose manifest.json is lost still refuses a changed tokenizer on resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from vlmerge.cli.main import main
from vlmerge.training.run_directory import CONFIG_FILE, MANIFEST_FILE
from vlmerge.training.trainer import CHECKPOINT

SEED = {
    "data": {"image_size": 32, "limit": 64},
    "optimizer": {"batch_size": 8, "lr": 2e-3},
    "tokenizer": {"vocab_size": 100},
    "steps": 2,
    "checkpoint_every": 1,
}
RANKS = 2
TIMEOUT_S = 180  # a job whose processes wait for each other past this has hung: the test fails


@pytest.fixture(scope="module")
def seed_run(emoji_sources, tmp_path_factory) -> Path:
    """A finished 2-step seed run; tests tamper with copies of it."""
    run_dir = tmp_path_factory.mktemp("seed") / "run"
    config = run_dir.parent / "seed.yaml"
    config.write_text(yaml.safe_dump(SEED))
    assert main(["train", "seed", "--config", str(config), "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir


def copy_run(seed_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(seed_run, tmp_path / "run"))


def launch(tmp_path: Path, *argv: str) -> list[tuple[int, str]]:
    """`python -m vlmerge ARGV` as the two processes of a gloo job (the environment torchrun gives them,
    without torchrun, which would kill the rest once one fails): each one's exit code and stderr."""
    common = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(RANKS),
        "OMP_NUM_THREADS": "1",
    }
    logs = [tmp_path / f"rank{rank}.err" for rank in range(RANKS)]
    processes = []
    for rank, log in enumerate(logs):
        env = {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        with open(log, "w") as err:
            command = [sys.executable, "-m", "vlmerge", *argv]
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        codes = [process.wait(timeout=TIMEOUT_S) for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung: {[log.read_text()[-500:] for log in logs]}")
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return list(zip(codes, (log.read_text() for log in logs)))


def assert_one_error_on_the_main_process(outcome: list[tuple[int, str]], message: str) -> None:
    (main_code, main_err), *others = outcome
    assert main_code == 2 and main_err.strip().splitlines() == [main_err.strip()], main_err
    assert "error:" in main_err and message in main_err, main_err
    for code, err in others:
        assert code == 2 and err.strip() == "", err  # stopped with it, quietly: no second error, no traceback


def train_argv(tmp_path: Path, config: dict, run_dir: Path) -> list[str]:
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["train", "seed", "--config", str(path), "--run-dir", str(run_dir), "--quiet"]


def test_a_check_that_fails_on_the_main_process_alone_ends_every_process(tmp_path):
    """The main process alone opens the run directory: here one of another config."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump({**SEED, "steps": 7}))
    outcome = launch(tmp_path, *train_argv(tmp_path, SEED, run_dir))
    assert_one_error_on_the_main_process(outcome, "holds a run with a different config")


def test_a_check_that_fails_on_every_process_is_reported_once(seed_run, tmp_path):
    """Every process checks the checkpoint it resumes from; the refusal is printed by the main one only."""
    run_dir = copy_run(seed_run, tmp_path)
    (run_dir / CHECKPOINT).write_bytes(b"not a zip file at all")
    outcome = launch(tmp_path, *train_argv(tmp_path, SEED, run_dir))
    assert_one_error_on_the_main_process(outcome, "not a checkpoint written by torch.save")


# ---- resume without manifest.json ---------------------------------------------------------------
def swap_two_tokens(path: Path) -> None:
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tokenizer))


def train(capsys, tmp_path: Path, run_dir: Path) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(train_argv(tmp_path, SEED, run_dir))
    return code, capsys.readouterr().err.strip().splitlines()


def test_resume_refuses_a_changed_tokenizer_when_the_manifest_is_gone(seed_run, tmp_path, capsys):
    """The checkpoint carries the manifest, tokenizer hash included: it stands in for a lost manifest.json."""
    run_dir = copy_run(seed_run, tmp_path)
    model = (run_dir / "model.safetensors").read_bytes()
    (run_dir / MANIFEST_FILE).unlink()
    swap_two_tokens(run_dir / "tokenizer.json")  # same vocabulary size: the weights' shapes still fit
    code, err = train(capsys, tmp_path, run_dir)
    assert code == 2 and len(err) == 1, err
    assert "tokenizer.json is not the tokenizer this run was trained with" in err[0] and CHECKPOINT in err[0]
    assert (run_dir / "model.safetensors").read_bytes() == model and not (run_dir / MANIFEST_FILE).exists()


def test_a_lost_manifest_is_restored_from_the_checkpoint_when_nothing_changed(seed_run, tmp_path, capsys):
    run_dir = copy_run(seed_run, tmp_path)
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    (run_dir / MANIFEST_FILE).unlink()
    assert train(capsys, tmp_path, run_dir) == (0, [])
    assert json.loads((run_dir / MANIFEST_FILE).read_text()) == manifest
