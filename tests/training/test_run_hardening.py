"""Run directories and the study, guarded: a run holds its directory's lock and keeps a
manifest that resume checks; a config error claims nothing; a checkpoint is checked before it is
trusted; config numbers are finite and never bools; study names are plain file names; a corrupt
cache entry is run again; a study directory is locked; a moved study reuses its stages; a study
killed mid-stage resumes to identical results. Every refusal is one line and exit 2, through the CLI.
"""

import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vlmerge.cli.main import main
from vlmerge.study.execute import lock_study
from vlmerge.study.plan import StageKind, plan_study
from vlmerge.study.recipe import load_recipe
from vlmerge.study.runner import load_results, run_study
from vlmerge.training.config import parse_stage_config
from vlmerge.training.run_directory import CONFIG_FILE, LOCK_FILE, MANIFEST_FILE
from vlmerge.training.trainer import CHECKPOINT, read_metrics

RECIPES = Path(__file__).parents[2] / "recipes"
MICRO = RECIPES / "micro-test.yaml"
DATA = {"image_size": 32, "limit": 64}
SEED = {
    "data": DATA,
    "optimizer": {"batch_size": 8, "lr": 2e-3},
    "tokenizer": {"vocab_size": 100},
    "steps": 4,
    "checkpoint_every": 2,
}
TIMEOUT_S = 120
# Holds an flock on the file it is given, as another vlmerge process would, until it is killed.
HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "handle = open(sys.argv[1], 'a')\n"
    "fcntl.flock(handle, fcntl.LOCK_EX)\n"
    "handle.write(str(os.getpid())); handle.flush()\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def train(capsys, config: dict, run_dir: Path, stage: str = "seed") -> tuple[int, list[str]]:
    """`vlmerge train` on `config` (written beside the run directory): exit code and stderr lines."""
    path = run_dir.parent / f"{run_dir.name}-{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["train", stage, "--config", str(path), "--run-dir", str(run_dir), "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(outcome: tuple[int, list[str]], *words: str) -> None:
    code, err = outcome
    assert code == 2 and len(err) == 1, err
    assert all(word in err[0] for word in words), err[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hold_lock(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=TIMEOUT_S)
    if process.stdout:
        process.stdout.close()


@pytest.fixture(scope="module")
def seed_run(emoji_sources, tmp_path_factory) -> Path:
    """A finished 4-step seed run (checkpoints at steps 2 and 4); tests tamper with copies of it."""
    run_dir = tmp_path_factory.mktemp("seed") / "run"
    (run_dir.parent / "seed.yaml").write_text(yaml.safe_dump(SEED))
    config = str(run_dir.parent / "seed.yaml")
    assert main(["train", "seed", "--config", config, "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir


def copy_run(seed_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(seed_run, tmp_path / "run"))


# ---- 1. the lock and the manifest ---------------------------------------------------------------
def test_a_run_directory_is_locked_for_the_run_and_freed_when_its_holder_dies(emoji_sources, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir / LOCK_FILE)
    try:
        assert_refused(train(capsys, SEED, run_dir), f"{run_dir} is in use by another run", f"process {holder.pid}")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing claimed, nothing trained
    finally:
        kill(holder)  # SIGKILL: the kernel drops its lock
    assert train(capsys, SEED, run_dir)[0] == 0
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    assert manifest["step"] == SEED["steps"] and manifest["tokenizer_sha256"] == sha256(run_dir / "tokenizer.json")
    assert manifest["inputs"] == {} and len(manifest["config_sha256"]) == 64


def test_resume_refuses_a_run_whose_config_yaml_is_gone(seed_run, tmp_path, capsys):
    run_dir = copy_run(seed_run, tmp_path)
    (run_dir / CONFIG_FILE).unlink()
    assert_refused(train(capsys, {**SEED, "steps": 8}, run_dir), "config.yaml is missing", CHECKPOINT)
    assert_refused(train(capsys, SEED, run_dir), "config.yaml is missing")  # even the same config: it is lost


def test_resume_refuses_a_config_yaml_edited_to_match_another_config(seed_run, tmp_path, capsys):
    run_dir = copy_run(seed_run, tmp_path)
    edited = {**yaml.safe_load((run_dir / CONFIG_FILE).read_text()), "steps": 8}
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(edited, sort_keys=False))
    assert_refused(train(capsys, {**SEED, "steps": 8}, run_dir), "config.yaml was changed after the run started")


def swap_two_tokens(path: Path) -> None:
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda path: path.unlink(), "tokenizer.json is missing, but this run was trained with it"),
        (swap_two_tokens, "tokenizer.json is not the tokenizer this run was trained with"),
    ],
    ids=["deleted", "changed"],
)
def test_resume_refuses_a_run_whose_tokenizer_is_gone_or_changed(seed_run, tmp_path, capsys, tamper, message):
    run_dir = copy_run(seed_run, tmp_path)
    model = sha256(run_dir / "model.safetensors")
    tamper(run_dir / "tokenizer.json")
    assert_refused(train(capsys, SEED, run_dir), message)
    assert sha256(run_dir / "model.safetensors") == model


def test_resume_refuses_a_run_whose_init_file_changed(seed_run, tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    shutil.copyfile(seed_run / "model.safetensors", init)
    specific = {**SEED, "init": str(init), "tokenizer": {}, "steps": 2, "checkpoint_every": 1}
    run_dir = tmp_path / "specific"
    assert train(capsys, specific, run_dir, "specific")[0] == 0
    moved = tmp_path / "moved.safetensors"
    shutil.move(init, moved)  # the same file at another path: accepted, config.yaml follows it
    assert train(capsys, {**specific, "init": str(moved)}, run_dir, "specific")[0] == 0
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text())["init"] == str(moved)
    with open(moved, "r+b") as handle:  # another file under the same path
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert_refused(train(capsys, {**specific, "init": str(moved)}, run_dir, "specific"), "is not the file this run")


# ---- 2. a config error claims nothing ------------------------------------------------------------
def test_a_late_config_error_claims_nothing_and_the_corrected_config_runs_there(seed_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert_refused(train(capsys, {**SEED, "data": {**DATA, "image_size": 36}}, run_dir), "image_size 36")
    assert not (run_dir / CONFIG_FILE).exists() and not (run_dir / MANIFEST_FILE).exists()
    assert train(capsys, SEED, run_dir)[0] == 0

    finetune = {
        "task": "classify_text",
        "init": str(seed_run / "model.safetensors"),
        "data": {**DATA, "image_size": 48},
        "optimizer": {"batch_size": 8},
        "steps": 2,
        "checkpoint_every": 2,
    }
    finetune_dir = tmp_path / "finetune"
    assert_refused(train(capsys, finetune, finetune_dir, "finetune"), "takes 32px images")
    assert not (finetune_dir / CONFIG_FILE).exists()
    assert train(capsys, {**finetune, "data": DATA}, finetune_dir, "finetune")[0] == 0


# ---- 3. checkpoint.pt checked on resume ------------------------------------------------------------
def first_tensor(state: dict) -> str:
    return next(iter(state["modules"]["model"]))


def reshaped(state: dict) -> dict:
    state["modules"]["model"][first_tensor(state)] = torch.zeros(3, 3)
    return state


def with_nan(state: dict) -> dict:
    key = next(k for k, v in state["modules"]["model"].items() if v.is_floating_point())
    state["modules"]["model"][key] = torch.full_like(state["modules"]["model"][key], float("nan"))
    return state


def without(key: str):
    return lambda state: {k: v for k, v in state.items() if k != key}


def at_step(step: int):
    return lambda state: {**state, "step": step}


def nested_200_deep(state: dict) -> dict:
    extra: list = []
    for _ in range(200):
        extra = [extra]
    return {**state, "extra": extra}


CHECKPOINT_CASES = {
    "another-model": (reshaped, "not a checkpoint of this model (model."),
    "no-optimizer": (without("optimizer"), "it has no optimizer"),
    "a-list": (lambda state: [1, 2, 3], "it holds a list"),
    "nan-weights": (with_nan, "holds NaN or infinite values"),
    "step-100": (at_step(100), "its step 100 is not a step of this 4-step run"),
    "step-minus-5": (at_step(-5), "its step -5 is not a step"),
    "an-older-step": (at_step(2), "it holds step 2, but the run had checkpointed step 4"),
    "a-pickled-object": (lambda state: {**state, "extra": pathlib.PurePosixPath("x")}, "never unpickled"),
    "not-torch": (None, "not a checkpoint written by torch.save"),
    "nested-200-deep": (nested_200_deep, "nested more than 100"),  # refused before torch.load walks it
    "deleted": (False, "missing, but the run checkpointed step 4"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_checkpoint_that_is_not_this_runs_is_one_named_error(seed_run, tmp_path, capsys, case):
    tamper, message = CHECKPOINT_CASES[case]
    run_dir = copy_run(seed_run, tmp_path)
    path, model = run_dir / CHECKPOINT, sha256(run_dir / "model.safetensors")
    if tamper is False:
        path.unlink()
    elif tamper is None:
        path.write_bytes(b"not a zip file at all")
    else:
        torch.save(tamper(torch.load(path, weights_only=True)), path)
    assert_refused(train(capsys, SEED, run_dir), message, "use a new run directory")
    assert sha256(run_dir / "model.safetensors") == model


# ---- 4. config numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage, text, message",
    [
        ("seed", "optimizer: {lr: .inf}", "optimizer.lr: expected a finite number, got inf"),
        ("seed", "optimizer: {lr: .nan}", "optimizer.lr: expected a finite number, got nan"),
        ("seed", "optimizer: {lr: true}", "optimizer.lr: expected a number, got true"),
        ("seed", "optimizer: {weight_decay: .inf}", "optimizer.weight_decay: expected a finite number"),
        ("seed", "optimizer: {grad_clip: .inf}", "optimizer.grad_clip: expected a finite number"),
        ("seed", "model: {layer_scale_init: .inf}", "model.layer_scale_init: expected a finite number"),
        ("seed", "objectives: {itc: .inf}", "objectives.itc: expected a finite number"),
        ("seed", "objectives: {mlm: false}", "objectives.mlm: expected a number, got false"),
        ("finetune", "task: retrieval\ninit: x\noptimizer: {head_lr_multiplier: .inf}", "head_lr_multiplier"),
        ("seed", "steps: true", "steps: expected a number, got true"),
        ("seed", "optimizer: {batch_size: true}", "optimizer.batch_size: expected a number, got true"),
        ("seed", "random_seed: false", "random_seed: expected a number, got false"),
    ],
)
def test_a_config_number_that_is_not_finite_or_is_a_bool_is_refused(tmp_path, capsys, stage, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(f"{text}\ndata: {{limit: 8}}\n")  # on a config that got through, a later error
    assert main(["train", stage, "--config", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_yaml_ints_still_count_as_floats():
    config = parse_stage_config("seed", {"optimizer": {"lr": 1, "grad_clip": 2}, "objectives": {"itc": 0}})
    assert (config.optimizer.lr, config.optimizer.grad_clip, config.objectives.itc) == (1.0, 2.0, 0.0)
    assert isinstance(config.optimizer.lr, float)


def test_a_recipe_number_that_is_not_finite_is_refused(tmp_path, capsys):
    base = yaml.safe_load(MICRO.read_text())
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({**base, "parity_margin": float("inf"), "finetune": {"optimizer": {"lr": True}}})
    )
    assert main(["study", str(tmp_path / "bad.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity_margin: expected a finite number" in err[0] and "finetune.optimizer.lr" in err[0]


# ---- 5. the study ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped-study", "ABSOLUTE", "a/b", "", ".hidden", ".."])
def test_a_recipe_name_that_is_not_a_plain_file_name_is_refused_before_any_work(tmp_path, monkeypatch, capsys, name):
    name = str(tmp_path / "absolute-study") if name == "ABSOLUTE" else name
    base = yaml.safe_load(MICRO.read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**base, "name": name}))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(["study", str(tmp_path / "recipe.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a safe study name" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "recipe.yaml"] and list(work.iterdir()) == []


@pytest.fixture(scope="module")
def micro_study(emoji_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "study"
    return out, run_study(load_recipe(MICRO), out, progress=False, report=False)


def same_results(a, b) -> bool:
    return (a.models, a.claims, a.control, a.mergeability, a.gallery) == (
        b.models,
        b.claims,
        b.control,
        b.mergeability,
        b.gallery,
    )


def test_a_moved_study_reuses_every_stage(micro_study, tmp_path):
    out, first = micro_study
    moved = Path(shutil.copytree(out, tmp_path / "elsewhere" / "study"))
    again = run_study(load_recipe(MICRO), moved, progress=False, report=False)
    assert again.timing.stages_run == 0 and again.timing.stages_cached == first.timing.stages
    assert same_results(again, first)


@pytest.mark.parametrize(
    "corrupt",
    [lambda text: text[: len(text) // 2], lambda text: json.dumps({**json.loads(text), "kind": "merge"})],
    ids=["cut-short", "another-stage"],
)
def test_a_corrupt_done_json_is_named_and_its_stage_runs_again(micro_study, tmp_path, capsys, corrupt):
    out, first = micro_study
    study = Path(shutil.copytree(out, tmp_path / "study"))
    stage = next(s for s in plan_study(load_recipe(MICRO)).stages if s.kind is StageKind.ZERO_SHOT)
    marker = study / "cache" / stage.name / "done.json"
    marker.write_text(corrupt(marker.read_text()))
    capsys.readouterr()
    again = run_study(load_recipe(MICRO), study, progress=False, report=False)
    assert again.timing.stages_run == 1 and same_results(again, first)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and f"{marker}: unreadable" in warnings[0] and "running the stage again" in warnings[0]


def test_a_second_study_on_a_locked_study_directory_is_refused(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    holder = hold_lock(study / LOCK_FILE)
    try:
        assert main(["study", str(MICRO), "--out", str(study), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{study} is in use by another study (process {holder.pid})" in err[0], err
        assert sorted(p.name for p in study.iterdir()) == [LOCK_FILE]
    finally:
        kill(holder)
    with lock_study(study):  # released by the holder's death
        pass


# ---- 6. SIGKILL mid-stage -------------------------------------------------------------------------
def stage_under_way(study: Path) -> Path | None:
    """A stage directory whose training has checkpointed but not finished (no done.json), once a stage is done."""
    cache = study / "cache"
    if not any(cache.glob("*/done.json")):
        return None
    return next((p.parent for p in cache.glob(f"*/{CHECKPOINT}") if not (p.parent / "done.json").exists()), None)


def stop_mid_stage(study: Path) -> tuple[subprocess.Popen, Path]:
    """Start `vlmerge study` on the micro recipe and freeze it (SIGSTOP) while a stage is under way."""
    command = [sys.executable, "-m", "vlmerge", "study", str(MICRO), "--out", str(study), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        if stage_under_way(study) is not None:
            process.send_signal(signal.SIGSTOP)
            if process.poll() is None and (stage := stage_under_way(study)) is not None:
                return process, stage
            process.send_signal(signal.SIGCONT)  # it finished the stage between the look and the stop
        time.sleep(0.005)
    process.kill()
    process.wait()
    pytest.fail("vlmerge study ended (or ran too long) before a stage was seen under way")


def test_a_study_killed_mid_stage_resumes_to_identical_results_in_place_and_moved(micro_study, tmp_path):
    _, first = micro_study
    killed = tmp_path / "killed"
    process, stage = stop_mid_stage(killed)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL and not (stage / "done.json").exists()
    moved = Path(shutil.copytree(killed, tmp_path / "elsewhere" / "killed"))  # its config.yaml names old paths

    for study in (killed, moved):
        assert main(["study", str(MICRO), "--out", str(study), "--quiet"]) == 0
        again = load_results(study)
        assert same_results(again, first)
        assert 0 < again.timing.stages_run < first.timing.stages
        config = yaml.safe_load((study / "cache" / stage.name / CONFIG_FILE).read_text())
        steps = [record["step"] for record in read_metrics(study / "cache" / stage.name)]
        assert steps == list(range(config["steps"]))  # resumed: no step logged twice, none lost


def test_an_os_error_during_training_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """A full disk while a run writes its checkpoint: one line naming the file, not a traceback."""
    import errno

    from vlmerge.cli.main import main
    from vlmerge.training import trainer

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoint.pt"))

    monkeypatch.setattr(trainer.Trainer, "save", full_disk)
    config = tmp_path / "seed.yaml"
    config.write_text(
        "steps: 2\ncheckpoint_every: 1\nmodel: {size: micro}\ndata: {image_size: 32, limit: 64}\n"
        "optimizer: {batch_size: 16}\ntokenizer: {vocab_size: 200}\n"
    )
    assert main(["train", "seed", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "checkpoint.pt" in err[0]
