"""Content-addressed stage cache: a stage's directory is named by its key (the hash of its kind, its
settings and its inputs' keys), and a `done.json` written last marks it complete. A complete stage is
never run again; an interrupted one resumes from its own checkpoints. A `done.json` that cannot be read
as this stage's record (cut short, edited, another stage's) marks nothing: the stage runs again, which
resumes its finished run, and a warning names the file. Keys and records hold no paths, so a study
directory can move. A stage's result is its kind's typed output (study/stages.py), read back by that type."""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import ConfigDict, JsonValue
from tqdm import tqdm

from vlmerge.core.config import FiniteFloat, StrictConfig
from vlmerge.core.errors import StudyError
from vlmerge.io.atomic import atomic_path
from vlmerge.study.graph import Stage

DONE = "done.json"
R = TypeVar("R", bound=StrictConfig)


class StageRecord(StrictConfig):
    """A stage's done.json: what ran (kind, settings, the names of its inputs), how long, and its result."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    kind: str
    settings: dict[str, JsonValue]
    inputs: dict[str, str]  # role -> the input stage's name
    seconds: FiniteFloat = 0.0
    result: dict[str, JsonValue]  # the stage's typed output, as JSON


@dataclass(frozen=True)
class StageOutput:
    directory: Path
    result: StrictConfig  # the stage's typed output (its kind's output type)
    seconds: float  # how long the stage took when it ran
    cached: bool  # taken from an earlier run

    def result_as(self, kind: type[R]) -> R:
        """The result as the type its reader expects; a mismatch is the plan's bug, named."""
        if not isinstance(self.result, kind):
            raise StudyError(f"{self.directory}: a {type(self.result).__name__} result, not a {kind.__name__}")
        return self.result


class StageCache:
    def __init__(self, root: Path, progress: bool = True) -> None:
        self.root = root
        self.progress = progress

    def cached(self, stage: Stage, output: type[StrictConfig]) -> StageOutput | None:
        """The stage's output, as `output`, if an earlier run completed it."""
        directory = self.root / stage.name
        marker = directory / DONE
        if not marker.exists():
            return None
        try:
            done = StageRecord.model_validate_json(marker.read_bytes())
            if done.kind != stage.kind.value:
                raise ValueError(f"not the record of a {stage.kind.value} stage")
            result = output.model_validate(done.result)
        except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            print(
                f"[study] warning: {marker}: unreadable ({_first_line(error)}); running the stage again",
                file=sys.stderr,
            )
            return None
        return StageOutput(directory, result, done.seconds, cached=True)

    def run(self, stage: Stage, output: type[R], work: Callable[[Path], R]) -> StageOutput:
        """The stage's output: from the cache, or by running `work(directory)`."""
        if (cached := self.cached(stage, output)) is not None:
            return cached
        directory = self.root / stage.name
        marker = directory / DONE
        directory.mkdir(parents=True, exist_ok=True)
        self.say(f"{stage.kind.value:<10} {stage.label} ...")
        start = time.perf_counter()
        result = work(directory)
        if not isinstance(result, output):
            raise StudyError(
                f"stage {stage.name}: its work returned a {type(result).__name__}, not a {output.__name__}"
            )
        seconds = round(time.perf_counter() - start, 2)
        record = StageRecord(
            kind=stage.kind.value,
            settings=stage.settings.model_dump(mode="json"),
            inputs={role: s.name for role, s in stage.inputs.items()},
            seconds=seconds,
            result=result.model_dump(mode="json"),
        )
        text = json.dumps(record.model_dump(mode="json"), indent=1, sort_keys=True)
        with atomic_path(marker) as tmp:
            tmp.write_text(text)
        self.say(f"{stage.kind.value:<10} {stage.label} done in {seconds:.1f} s")
        return StageOutput(directory, _read_back(output, text), seconds, cached=False)

    def say(self, line: str) -> None:
        """A line above the study's progress bar (tqdm's write keeps the bar whole)."""
        if self.progress:
            tqdm.write(f"[study] {line}", file=sys.stderr)


def _read_back(output: type[R], text: str) -> R:
    """What a later run reads back from the marker, so a fresh result and a cached one are the same object."""
    return output.model_validate(StageRecord.model_validate_json(text).result)


def _first_line(error: Exception) -> str:
    """pydantic's errors run over several lines; the warning is one."""
    return " ".join(str(error).split())
