"""Importing and merging a released base-size BEiT-3 file, against the same merge of a native file.

Usage: python benchmarks/released_merge.py [--size beit3-base] [--runs 3] [--workdir DIR]
Goal: importing and merging a base-size BEiT-3 stays within 2x the time of the same
merge on a native file. Writing it back in BEiT-3's layout writes every merged layer tensor under
both experts' names (tied): twice the bytes in a safetensors file, or a torch file written whole
by `torch.save` (not streamed) where the two names share one storage. The released file is a torch `.pth` holding `{"model": state_dict}` under
torchscale's names, as BEiT-3's releases are; torch files are read whole (the unpickler has no
streaming), safetensors a tensor at a time. Each run is a fresh subprocess; the figures are the
median and range of `--runs` runs, and the ratios are against the native merge of the same run.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vlmerge.io.layout import Layout, foreign_keys, to_layout
from vlmerge.models import create_model, save_model

CHILD = """
import json, sys, time
from vlmerge.merging import merge_checkpoint
source, out, layout = sys.argv[1:4]
start = time.perf_counter()
merge_checkpoint(source, "interpolation", out=out, selection="retrieval", layout=layout)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

CASES = {  # name: (source file, output file, output layout)
    "native safetensors -> native": ("native.safetensors", "out-native.safetensors", "native"),
    "released beit3 .pth -> native": ("released.pth", "out-from-released.safetensors", "native"),
    "released beit3 .pth -> beit3 safetensors (tied)": ("released.pth", "out-tied.safetensors", "beit3"),
    "released beit3 .pth -> beit3 .pth (tied)": ("released.pth", "out-tied.pth", "beit3"),
}


def write_inputs(size: str, workdir: Path) -> int:
    """The same random weights as a native checkpoint and as a BEiT-3 release; returns the file size."""
    torch.manual_seed(0)
    model = create_model(size)
    save_model(model, workdir / "native.safetensors")
    released = {
        name: to_layout(tensor, squeeze).clone()
        for key, tensor in model.state_dict().items()
        for name, squeeze in foreign_keys(key, Layout.BEIT3)
    }
    torch.save({"model": released}, workdir / "released.pth")
    return (workdir / "released.pth").stat().st_size


def measure(workdir: Path, source: str, out: str, layout: str) -> float:
    (workdir / out).unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(workdir / source), str(workdir / out), layout],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="beit3-base")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        size = write_inputs(args.size, workdir)
        print(f"{args.size}: released file {size / 2**20:.0f} MiB; {args.runs} runs, interpolation, retrieval experts")
        times: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(args.runs):  # interleaved, so drift in the machine's speed touches every case alike
            for name, (source, out, layout) in CASES.items():
                times[name].append(measure(workdir, source, out, layout))
        anchor = statistics.median(times["native safetensors -> native"])
        for name, runs in times.items():
            median = statistics.median(runs)
            print(
                f"  {name:<50} {median:6.2f} s (range {min(runs):.2f}-{max(runs):.2f})"
                f"  {median / anchor:4.2f}x the native merge"
            )


if __name__ == "__main__":
    main()
