"""Content-addressed stage cache: a stage's directory is named by its key (the hash of its kind, its
settings and its inputs' keys), and a `done.json` written last marks it complete. A complete stage is
never run again; an interrupted one resumes from its own checkpoints. A `done.json` that cannot be read
as this stage's record (cut short, edited, another stage's) marks nothing: the stage runs again, which
resumes its finished run, and a warning names the file. Keys and records hold no paths, so a study
directory can move."""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlmerge.io.atomic import atomic_path
from vlmerge.study.plan import Stage

DONE = "done.json"


@dataclass(frozen=True)
class StageOutput:
    directory: Path
    result: dict[str, Any]  # the stage's JSON result, as its work function returned it
    seconds: float  # how long the stage took when it ran
    cached: bool  # taken from an earlier run


class StageCache:
    def __init__(self, root: Path, progress: bool = True) -> None:
        self.root = root
        self.progress = progress

    def cached(self, stage: Stage) -> StageOutput | None:
        """The stage's output if an earlier run completed it."""
        directory = self.root / stage.name
        marker = directory / DONE
        if not marker.exists():
            return None
        try:
            done = json.loads(marker.read_text())
            if not isinstance(done, dict) or done.get("kind") != stage.kind.value:
                raise ValueError(f"not the record of a {stage.kind.value} stage")
            result, seconds = done["result"], done.get("seconds", 0.0)
            if not isinstance(result, dict) or isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise ValueError("its result or seconds are malformed")
        except (OSError, UnicodeDecodeError, KeyError, ValueError) as error:  # JSONDecodeError is a ValueError
            print(f"[study] warning: {marker}: unreadable ({error}); running the stage again", file=sys.stderr)
            return None
        return StageOutput(directory, result, seconds, cached=True)

    def run(self, stage: Stage, work: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """The stage's output: from the cache, or by running `work(directory)`."""
        if (cached := self.cached(stage)) is not None:
            return cached
        directory = self.root / stage.name
        marker = directory / DONE
        directory.mkdir(parents=True, exist_ok=True)
        self.say(f"{stage.kind.value:<10} {stage.label} ...")
        start = time.perf_counter()
        result = work(directory)
        seconds = round(time.perf_counter() - start, 2)
        record = {
            "kind": stage.kind.value,
            "settings": stage.settings,
            "inputs": {role: s.name for role, s in stage.inputs.items()},
            "seconds": seconds,
            "result": result,
        }
        text = json.dumps(record, indent=1, sort_keys=True)
        with atomic_path(marker) as tmp:
            tmp.write_text(text)
        self.say(f"{stage.kind.value:<10} {stage.label} done in {seconds:.1f} s")
        # What a later run reads back from the marker, so a fresh result and a cached one are the same object.
        return StageOutput(directory, json.loads(text)["result"], seconds, cached=False)

    def say(self, line: str) -> None:
        """A line above the study's progress bar (tqdm's write keeps the bar whole)."""
        if self.progress:
            tqdm.write(f"[study] {line}", file=sys.stderr)
