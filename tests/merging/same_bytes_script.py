"""Collect statistics and merge with every registered method, at the thread count the environment gives.

`python same_bytes_script.py CHECKPOINT SEED OUT_DIR`: run by tests/test_same_bytes.py under different
`OMP_NUM_THREADS`; the test compares the bytes of everything written to OUT_DIR.
"""

import sys
from pathlib import Path

from vlmerge.cli.main import main
from vlmerge.merging import MERGE_METHODS, merge_checkpoint
from vlmerge.merging.registry import Statistics

SEQUENTIAL_ALPHA = 0.5  # the RegMean++ merge uses the alpha its sequential Gram file was collected with


def collect(checkpoint: Path, out: Path) -> dict[str, Path]:
    common = [str(checkpoint), "--limit", "16", "--batch-size", "8", "--quiet"]
    files = {"grams": out / "grams.safetensors", "fisher": out / "fisher.safetensors"}
    files["sequential"] = out / "sequential.safetensors"
    assert main(["grams", *common, "--out", str(files["grams"])]) == 0
    assert (
        main(["grams", *common, "--sequential", "--alpha", str(SEQUENTIAL_ALPHA)] + ["--out", str(files["sequential"])])
        == 0
    )
    assert main(["fisher", *common, "--out", str(files["fisher"])]) == 0
    return files


def merge_every_method(checkpoint: Path, seed: Path, statistics: dict[str, Path], out: Path) -> None:
    for name in MERGE_METHODS:
        method = MERGE_METHODS.get(name)
        grams = statistics["sequential" if method.check_statistics else "grams"]
        merge_checkpoint(
            checkpoint,
            name,
            {"alpha": SEQUENTIAL_ALPHA} if method.check_statistics else None,
            out=out / f"merged-{name}.safetensors",
            selection="retrieval" if method.max_experts == 2 else "all",  # slerp: v and l, not the fusion vl
            seed_checkpoint=seed if method.needs_origin else None,
            grams=grams if method.statistics is Statistics.GRAMS else None,
            fisher=statistics["fisher"] if method.statistics is Statistics.FISHER else None,
        )


if __name__ == "__main__":
    checkpoint, seed, out = (Path(arg) for arg in sys.argv[1:4])
    out.mkdir(parents=True)
    merge_every_method(checkpoint, seed, collect(checkpoint, out), out)
