"""Study throughput: stages per minute of one small study run three ways, in the same process run.

- in order, each stage on two threads (how the runner worked before stages were pinned to one thread);
- in order, each stage on one thread (`--workers 1`, the default);
- two stages side by side, one thread each (`--workers 2`).

Each run starts from an empty study directory (the emoji build is cached once, before the first
timing). It prints the wall time, stages per minute and the ratio of each against the in-order,
one-thread run, and where the minutes go (seconds per stage kind, as the stages recorded them).
Time nothing else while it runs: two PyTorch processes on two cores slow each other badly.
"""

import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from vlmerge.data.config import DataConfig
from vlmerge.data.sources import load_pairs
from vlmerge.study import execute
from vlmerge.study.recipe import StudyRecipe
from vlmerge.study.runner import run_study

RECIPE = {
    "name": "throughput",
    "random_seeds": [0, 1],
    "data": {"image_size": 32, "limit": 1200},
    "model": {"size": "micro"},
    "tokenizer": {"vocab_size": 600},
    "pretrain_optimizer": {"batch_size": 32, "lr": 1.0e-3, "warmup_steps": 10},
    "total_steps": 120,
    "checkpoint_every": 60,
    "seed_fractions": [0.0, 0.5],
    "architectures": ["all"],
    "tasks": ["classify_image", "classify_text", "retrieval"],
    "protocols": ["finetune", "probe", "zeroshot"],
    "finetune": {"steps": 60, "optimizer": {"batch_size": 32, "lr": 1.0e-3, "warmup_steps": 5}},
    "probe": {"steps": 60, "optimizer": {"batch_size": 32, "lr": 1.0e-2, "warmup_steps": 5}},
    "gallery_size": 0,
}


def timed(recipe: StudyRecipe, workers: int, threads: int) -> tuple[float, int, dict[str, float]]:
    execute.STAGE_THREADS = threads
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        results = run_study(recipe, directory, progress=False, report=False, workers=workers)
        seconds = time.perf_counter() - start
        by_kind: dict[str, float] = defaultdict(float)
        for marker in Path(directory, "cache").glob("*/done.json"):
            done = json.loads(marker.read_text())
            probe = done["kind"] == "finetune" and done["settings"].get("freeze_backbone")
            by_kind["probe" if probe else done["kind"]] += done["seconds"]
    return seconds, results.timing.stages_run, dict(by_kind)


def main() -> int:
    recipe = StudyRecipe.parse(RECIPE)
    load_pairs(DataConfig.parse(RECIPE["data"]), "train")  # build the emoji cache before timing
    runs = {
        "in order, 2 threads per stage": timed(recipe, 1, 2),
        "in order, 1 thread per stage (--workers 1)": timed(recipe, 1, 1),
        "2 workers, 1 thread each (--workers 2)": timed(recipe, 2, 1),
    }
    anchor = runs["in order, 1 thread per stage (--workers 1)"][0]
    print(f"study of {runs[next(iter(runs))][1]} stages (protocols: {', '.join(RECIPE['protocols'])})")
    for name, (seconds, stages, _) in runs.items():
        print(
            f"  {name:<44} {seconds:7.1f} s  {60 * stages / seconds:6.1f} stages/min  "
            f"{anchor / seconds:5.2f}x the in-order one-thread run"
        )
    seconds, _, by_kind = runs["in order, 1 thread per stage (--workers 1)"]
    print("where the minutes go (in order, one thread; seconds per stage kind):")
    for kind, spent in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<14} {spent:7.1f} s  {spent / seconds:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
