"""Fault injection: `vlmerge merge` killed with SIGKILL while it streams its output.

A merge writes to a temporary beside the destination (`.merged.safetensors.<random>.tmp`, see
vlmerge.io.atomic) and renames it into place only once every tensor is written. So a killed merge
must leave nothing at the destination and its source byte for byte as it was.

The temporary of a SIGKILLed process stays behind: nothing runs in a killed process to remove it.
That is the behaviour we want, not a leak to fix: it is hidden, named after its destination, never
read as a checkpoint, and the next merge to the same destination writes its own temporary, ignores
the stale one and succeeds. Deleting stale temporaries automatically could delete one that a
concurrent merge is still writing.

(SIGKILL during a training resume is tested in test_trainer.py.)
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmerge.io.checkpoint import file_sha256, open_checkpoint
from vlmerge.merging import merge_checkpoint
from vlmerge.models import VLTransformer, load_model, model_config, save_model

# Depths of the `tiny` size (small vocabulary: the time goes into merging blocks, not copying
# embeddings), tried in turn until a merge still runs when its output starts to stream.
DEPTHS = [2, 6, 16]
TIMEOUT_S = 120


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def streaming_tensors(tmp: Path) -> bool:
    """True once the temporary holds more than its safetensors header: tensors are being written."""
    try:
        with open(tmp, "rb") as handle:
            prefix = handle.read(8)
        return len(prefix) == 8 and tmp.stat().st_size > 8 + int.from_bytes(prefix, "little")
    except FileNotFoundError:  # renamed into place between the glob and the open
        return False


def stop_mid_merge(source: Path, out: Path) -> tuple[subprocess.Popen, Path] | None:
    """Start `vlmerge merge`, freeze it with SIGSTOP while tensors stream into its temporary.

    Returns the stopped process and its temporary, or None if the merge finished first (too
    small a checkpoint for this machine). SIGSTOP makes what follows race-free: the process is
    frozen while we check that it is mid-merge (temporary present, destination absent).
    """
    command = [
        sys.executable,
        "-m",
        "vlmerge",
        "merge",
        str(source),
        "--method",
        "interpolation",
        "--out",
        str(out),
        "--quiet",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        streaming = [tmp for tmp in temporaries(out) if streaming_tensors(tmp)]
        if streaming:
            process.send_signal(signal.SIGSTOP)
            if process.poll() is None and streaming[0].exists() and not out.exists():
                return process, streaming[0]
            process.send_signal(signal.SIGCONT)  # it finished between the check and the stop
            break
        time.sleep(0.001)
    if process.poll() is None and time.monotonic() >= deadline:
        process.kill()
        pytest.fail(f"vlmerge merge still running after {TIMEOUT_S} s")
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()
    return None


def test_sigkill_mid_merge_leaves_no_output_and_the_source_untouched(tmp_path):
    for depth in DEPTHS:
        torch.manual_seed(0)
        source = save_model(
            VLTransformer(model_config("tiny", depth=depth, vocab_size=1000)),
            tmp_path / f"specific-{depth}.safetensors",
        )
        source_sha = file_sha256(source)
        out = tmp_path / f"merged-{depth}" / "merged.safetensors"
        stopped = stop_mid_merge(source, out)
        if stopped is not None:
            break
        out.unlink()
    else:
        pytest.fail(
            f"every merge (tiny, depths {DEPTHS}) finished before its output was seen streaming into "
            f"a temporary .{out.name}.*.tmp; make the checkpoint bigger, or has the temporary's name changed?"
        )

    process, tmp = stopped
    try:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL  # killed while it ran, not finished
    assert not out.exists()
    assert file_sha256(source) == source_sha
    assert temporaries(out) == [tmp]  # the stale temporary: hidden, never at the destination
    stale = tmp.read_bytes()

    merge_checkpoint(source, "interpolation", out=out)  # the next merge ignores it and succeeds
    load_model(out)  # strict: a complete modality-agnostic checkpoint
    assert json.loads(open_checkpoint(out).metadata["merge"])["inputs"]["source"]["sha256"] == source_sha
    assert tmp.read_bytes() == stale
    assert file_sha256(source) == source_sha
