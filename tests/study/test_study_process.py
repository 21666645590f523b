"""The study as a process: its workers die with it (SIGKILL included), its stages write the same bytes
wherever the study lives, and it tells how far it is (stages done of all, time left) or, quiet, sums up."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmerge.cli.main import main
from vlmerge.study import execute, runner
from vlmerge.study.cache import DONE
from vlmerge.study.plan import Stage, StageKind, plan_study
from vlmerge.study.recipe import load_recipe
from vlmerge.study.results import Timing
from vlmerge.study.stages import Written

MICRO = Path(__file__).parents[2] / "recipes" / "micro-test.yaml"
TIMEOUT_S = 180  # generous for a loaded machine; a wait past it fails rather than hangs
GONE_WITHIN_S = 20


# ---- processes, read from /proc ---------------------------------------------------------------------
def stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def identity(pid: int) -> tuple[int, str] | None:
    """The pid with its start time: a pid the kernel hands out again later is another process."""
    fields = stat(pid)
    return (pid, fields[19]) if fields else None


def running(process: tuple[int, str]) -> bool:
    """Still there and not a zombie (an orphan's exit may wait for a reaper that is not ours)."""
    fields = stat(process[0])
    return fields is not None and fields[19] == process[1] and fields[0] != "Z"


def children(pid: int) -> list[int]:
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [child for child in pids if (fields := stat(child)) and int(fields[1]) == pid]


def descendants(pid: int) -> set[tuple[int, str]]:
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if (known := identity(child)) is not None and known not in found:
                found.add(known)
                todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for_workers(study: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while sum("spawn_main" in command_line(child) for child in children(study.pid)) < count:
        assert study.poll() is None, f"the study ended (exit {study.returncode}) before {count} workers ran"
        assert time.monotonic() < deadline, f"no {count} workers within {TIMEOUT_S} s"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_study_leaves_no_process_behind(emoji_sources, tmp_path):
    """SIGKILL cannot be caught: the workers and multiprocessing's resource tracker must end on their own."""
    command = [sys.executable, "-m", "vlmerge", "study", str(MICRO), "--out", str(tmp_path), "--workers", "2"]
    study = subprocess.Popen([*command, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left: set[tuple[int, str]] = set()
    try:
        wait_for_workers(study, 2)
        left = descendants(study.pid)
        assert any("resource_tracker" in command_line(pid) for pid, _ in left), [command_line(p) for p, _ in left]
        study.send_signal(signal.SIGKILL)
        study.wait(timeout=TIMEOUT_S)
        deadline = time.monotonic() + GONE_WITHIN_S
        while (alive := {p for p in left if running(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"still running {GONE_WITHIN_S} s after the study was killed: " + "; ".join(
            command_line(pid) for pid, _ in alive
        )
    finally:
        study.kill()
        study.wait()
        for process in left:
            if running(process):
                os.kill(process[0], signal.SIGKILL)


# ---- the same bytes wherever the study lives --------------------------------------------------------
def with_inputs(stage: Stage) -> list[Stage]:
    """The stage and every stage it reads from, inputs first."""
    return [s for i in stage.inputs.values() for s in with_inputs(i)] + [stage]


def stage_files(directory: Path) -> dict[str, bytes]:
    """What a stage wrote, but its lock file and the time it took (done.json's `seconds`)."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    files.pop(".lock", None)
    done = json.loads(files.pop(DONE))
    assert done.pop("seconds") >= 0
    return {**files, DONE: json.dumps(done, sort_keys=True).encode()}


def test_the_same_stages_in_two_study_directories_write_the_same_bytes(emoji_sources, tmp_path):
    """Pre-training, Gram matrices, a RegMean merge reading them and the fine-tuning of the merge: their
    files record their inputs (run configs, provenance, results) and none may name the study directory."""
    plan = plan_study(load_recipe(MICRO))
    merge = next(s for s in plan.stages if s.kind is StageKind.MERGE and "grams" in s.inputs)
    finetune = next(s for s in plan.stages if s.kind is StageKind.FINETUNE and s.inputs["model"] is merge)
    stages = tuple(dict.fromkeys(with_inputs(finetune)))
    part = dataclasses.replace(plan, stages=stages)
    first, second = tmp_path / "one" / "study", tmp_path / "elsewhere" / "deeper" / "study"
    for study in (first, second):
        execute.execute(part, study, progress=False)
    for stage in stages:
        a, b = stage_files(first / "cache" / stage.name), stage_files(second / "cache" / stage.name)
        assert a.keys() == b.keys(), stage.name
        assert [name for name in a if a[name] != b[name]] == [], stage.name
        assert all(str(tmp_path).encode() not in content for content in a.values()), stage.name


# ---- progress --------------------------------------------------------------------------------------
def instant(settings, inputs, directory, progress) -> Written:
    time.sleep(0.02)
    return Written()


def work_instantly(monkeypatch) -> None:
    for kind in StageKind:
        monkeypatch.setitem(execute.WORK, kind, execute.StageWork(execute.WORK[kind].settings, Written, instant))


def test_a_study_shows_stages_done_of_all_and_the_time_left(tmp_path, monkeypatch, capsys):
    work_instantly(monkeypatch)
    plan = plan_study(load_recipe(MICRO))
    total = len(plan.stages)
    execute.execute(plan, tmp_path, progress=True)
    shown = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    bars = [line for line in shown if line.startswith("[study]") and " stages |" in line]
    assert bars[0].startswith(f"[study] 0/{total} stages |") and bars[0].endswith("00:00 elapsed, ? left")
    assert bars[-1].startswith(f"[study] {total}/{total} stages |") and bars[-1].endswith("00:00 left")
    midway = [line for line in bars if f"/{total} stages" in line and not line.endswith("? left")]
    assert any(not line.startswith(("[study] 0/", f"[study] {total}/")) for line in midway), bars
    assert f"[study] {plan.stages[0].kind.value:<10} {plan.stages[0].label} ..." in shown

    execute.execute(plan, tmp_path, progress=True)  # all cached: done from the start
    again = capsys.readouterr().err.replace("\r", "\n")
    assert f"[study] {total}/{total} stages |" in again and f"[study] 0/{total}" not in again


def test_a_quiet_study_prints_nothing_while_it_runs_and_one_summary_line(tmp_path, monkeypatch, capsys):
    work_instantly(monkeypatch)
    execute.execute(plan_study(load_recipe(MICRO)), tmp_path, progress=False)
    assert capsys.readouterr().err == ""

    def finished(recipe, out, progress, workers, submitit):
        assert not progress
        return dataclasses.make_dataclass("Results", ["timing"])(Timing(754.4, 40, 4, 700.0))

    monkeypatch.setattr(runner, "run_study", finished)
    assert main(["study", str(MICRO), "--out", str(tmp_path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("study micro-test: 44/44 stages done (40 run, 4 reused) in 754 s -> ")
