"""Content-addressed stage cache: a stage's directory is named by the hash of its full spec
(which names its inputs by their own hashed paths), and a `done.json` written last marks it
complete. A stage whose marker exists is never run again; an interrupted one resumes from
its own checkpoints."""

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmerge.io.atomic import atomic_path

DONE = "done.json"


def spec_hash(kind: str, spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"kind": kind, "spec": spec}, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    def __init__(self, root: Path, progress: bool = True, dry_run: bool = False) -> None:
        self.root = root
        self.progress = progress
        self.dry_run = dry_run  # plan only: record each stage, run none
        self.ran: list[str] = []
        self.cached: list[str] = []
        self.planned: list[tuple[str, str]] = []
        self.seconds: dict[str, float] = {}  # per distinct stage: how long it took when it ran

    def directory(self, kind: str, spec: dict[str, Any]) -> Path:
        return self.root / "cache" / f"{kind}-{spec_hash(kind, spec)[:16]}"

    def run(self, kind: str, spec: dict[str, Any], work: Callable[[Path], dict[str, Any]],
            label: str = "") -> tuple[Path, dict[str, Any]]:
        """The stage's directory and result: from the cache, or by running `work(directory)`."""
        directory = self.directory(kind, spec)
        marker = directory / DONE
        if self.dry_run:
            if (kind, label) not in self.planned:
                self.planned.append((kind, label))
            return directory, {}
        if marker.is_file():
            self.cached.append(directory.name)
            done = json.loads(marker.read_text())
            self.seconds[directory.name] = done.get("seconds", 0.0)
            return directory, done["result"]
        directory.mkdir(parents=True, exist_ok=True)
        self._say(f"{kind:<10} {label} ...")
        start = time.perf_counter()
        result = work(directory)
        seconds = time.perf_counter() - start
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"kind": kind, "spec": spec, "seconds": round(seconds, 2), "result": result},
                                      indent=1, sort_keys=True, default=str))
        self.ran.append(directory.name)
        self.seconds[directory.name] = round(seconds, 2)
        self._say(f"{kind:<10} {label} done in {seconds:.1f} s")
        return directory, result

    def _say(self, line: str) -> None:
        if self.progress:
            print(f"[study] {line}", file=sys.stderr, flush=True)
