"""Streamed merge of a base-size checkpoint: wall time next to a file copy, peak RSS next to the file size.

Usage: python benchmarks/merge_stream.py [--size base] [--methods interpolation regmean] [--workdir DIR]
Goals (issue 5): merge time <= 1.5x the copy; peak RSS <= 0.25x the checkpoint file.
Two copies anchor the time: a plain copy (the kernel copies the bytes, nothing reaches the
disk before the command returns) and a durable copy written the way every vlmerge output is
(temporary file, fsync, rename), which is what a merge pays for on top of its own work.
Each measurement runs in a fresh subprocess so peak RSS belongs to that step alone.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vlmerge.io.grams import save_grams
from vlmerge.merging.grams import gram_modules
from vlmerge.models import VLTransformer, model_config, save_model

# VmHWM, not ru_maxrss: ru_maxrss survives exec and would include the forked parent's image.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CHILD = f"""
import json, shutil, sys, time
from vlmerge.merging import merge_checkpoint
task, source, out, method, grams = sys.argv[1:6]
start = time.perf_counter()
if task == "copy":
    shutil.copyfile(source, out)
elif task == "durable-copy":
    from vlmerge.io.atomic import atomic_path
    with atomic_path(out) as tmp:
        shutil.copyfile(source, tmp)
else:
    merge_checkpoint(source, method, out=out, grams=grams if method == "regmean" else None)
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "peak_rss_bytes": {PEAK_RSS}}}))
"""


def measure(task: str, source: Path, out: Path, method: str, grams: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, task, str(source), str(out), method, str(grams)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_rss() -> int:
    """Peak RSS of a child that only imports vlmerge.merging (interpreter + torch)."""
    code = f"import vlmerge.merging; print({PEAK_RSS})"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument(
        "--methods", nargs="+", default=["interpolation", "regmean"], choices=["interpolation", "regmean"]
    )
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlmerge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = VLTransformer(model_config(args.size))
    source = save_model(model, workdir / "specific.safetensors")
    grams = save_grams(
        workdir / "grams.safetensors",
        {name: torch.eye(linear.in_features, dtype=torch.float64) for name, (linear, _) in gram_modules(model).items()},
        {},
        {"data": "identity (benchmark)"},
    )
    del model
    file_bytes = source.stat().st_size

    copy = measure("copy", source, workdir / "copy.safetensors", "", grams)
    durable = measure("durable-copy", source, workdir / "durable.safetensors", "", grams)
    base = baseline_rss()
    print(f"checkpoint: {args.size}, {file_bytes / 2**20:.0f} MiB")
    print(f"plain copy    {copy['seconds']:7.2f} s")
    print(f"durable copy  {durable['seconds']:7.2f} s   (temporary file, fsync, rename)")
    for method in args.methods:
        merge = measure("merge", source, workdir / f"merged-{method}.safetensors", method, grams)
        extra = merge["peak_rss_bytes"] - base
        print(
            f"{method}: {merge['seconds']:.2f} s, ratio to the plain copy {merge['seconds'] / copy['seconds']:.2f}x, "
            f"to the durable copy {merge['seconds'] / durable['seconds']:.2f}x (goal <= 1.5x); peak RSS "
            f"{extra / 2**20:.0f} MiB above the interpreter + torch baseline ({base / 2**20:.0f} MiB), "
            f"{extra / file_bytes:.2f}x the file (goal <= 0.25)"
        )
    shutil.rmtree(workdir) if args.workdir is None else None


if __name__ == "__main__":
    main()
