"""The same inputs give the same bytes, whatever the thread count and however the work is timed.

Every registered merge method, and the statistics the data-aware ones need (`vlmerge grams`,
`grams --sequential`, `fisher`), runs in a fresh process under 1 and under 2 intra-op threads; the
files must be identical. The model is wide enough (64, FFN 256) that MKL splits its solves, SVDs and
reductions between two threads, so a computation that follows the thread count shows up here.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vlmerge.merging.engine as engine
from vlmerge.data.tokenizer import RESERVED_TOKENS, TextTokenizer
from vlmerge.merging import MERGE_METHODS, merge_checkpoint
from vlmerge.models import VLTransformer, model_config, save_model
from vlmerge.models.heads import PretrainingHeads

SCRIPT = Path(__file__).with_name("same_bytes_script.py")


@pytest.fixture(scope="module")
def checkpoints(emoji_sources, tmp_path_factory):
    """A modality-specific checkpoint as training leaves it (tokenizer, heads, objectives) and a seed."""
    root = tmp_path_factory.mktemp("same-bytes")
    (root / "vocab.txt").write_text("\n".join([*RESERVED_TOKENS, "a", "face", "smiling", "cat", "dog"]) + "\n")
    tokenizer = TextTokenizer.from_vocab(root / "vocab.txt")
    torch.manual_seed(0)
    config = model_config("micro", width=64, vocab_size=tokenizer.vocab_size)
    metadata = {"tokenizer": tokenizer.to_json(), "run_config": json.dumps({"objectives": {"itm": 0.5}})}
    heads = PretrainingHeads(config.width, config.vocab_size)
    specific = save_model(
        VLTransformer(config), root / "specific.safetensors", extra_metadata=metadata, heads={"heads": heads}
    )
    seed = save_model(VLTransformer(config.agnostic()), root / "seed.safetensors")
    return specific, seed


def run_script(checkpoints, out: Path, threads: int) -> dict[str, bytes]:
    """The files the script writes to `out` (removed afterwards: every run writes to the same paths, which
    merged files record)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, str(SCRIPT), *map(str, checkpoints), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
    shutil.rmtree(out)
    return written


@pytest.mark.slow
def test_every_method_and_statistic_gives_the_same_bytes_under_one_and_two_threads(checkpoints, tmp_path):
    one, two = (run_script(checkpoints, tmp_path / "out", n) for n in (1, 2))
    expected = {f"merged-{name}.safetensors" for name in MERGE_METHODS} | {
        "grams.safetensors",
        "sequential.safetensors",
        "fisher.safetensors",
    }
    assert set(one) == set(two) == expected
    differing = sorted(name for name in one if one[name] != two[name])
    assert not differing, f"different bytes under 1 and 2 threads: {differing}"


@pytest.mark.parametrize("method", ["regmean", "tsv"])
def test_the_bytes_do_not_depend_on_when_the_inputs_finish_hashing(checkpoints, tmp_path, monkeypatch, method):
    """The hash runs beside the merge; a hash that finishes at once and one that finishes last give one file."""
    specific, seed = checkpoints
    grams = tmp_path / "grams.safetensors"
    from vlmerge.cli.main import main

    assert main(["grams", str(specific), "--limit", "8", "--batch-size", "8", "--quiet", "--out", str(grams)]) == 0
    kwargs = {"seed_checkpoint": seed} if method == "tsv" else {"grams": grams}
    early = merge_checkpoint(specific, method, out=tmp_path / "early.safetensors", **kwargs).path.read_bytes()
    hashes = engine.input_hashes

    def late(prepared, pending=False):
        if not pending:
            time.sleep(0.5)  # the merge is done long before the hash
        return hashes(prepared, pending)

    monkeypatch.setattr(engine, "input_hashes", late)
    assert merge_checkpoint(specific, method, out=tmp_path / "late.safetensors", **kwargs).path.read_bytes() == early
