"""Two processes (gloo, CPU, launched by torchrun) give the same Gram matrices as one process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from grams_script import all_batches, model

from vlmerge.merging.grams import collect_grams

SCRIPT = Path(__file__).parent / "grams_script.py"


@pytest.mark.slow
def test_two_process_gram_collection_matches_one_process(tmp_path):
    out = tmp_path / "grams.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=SCRIPT.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    distributed = torch.load(out, weights_only=True)
    net = model()
    grams, info = collect_grams(net, all_batches(net.config))
    assert set(distributed["grams"]) == set(grams)
    for key, gram in grams.items():
        torch.testing.assert_close(distributed["grams"][key], gram, rtol=1e-10, atol=1e-8)
        assert distributed["tokens"][key] == info[key]["tokens"]
