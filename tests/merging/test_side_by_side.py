"""Groups merged side by side: the same bytes and messages as one after another, in the groups' order."""

import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import vlmerge.merging.prepared_merge as prepared_merge_module
from vlmerge.merging import merge_checkpoint
from vlmerge.merging.registry import MergeWarning
from vlmerge.merging.side_by_side import WarningsByThread, ordered_map
from vlmerge.models import VLTransformer, model_config, save_model


def test_ordered_map_keeps_the_order_and_draws_at_most_ahead_items_beyond_the_consumer():
    drawn, finished = [], []

    def items():
        for i in range(8):
            drawn.append(i)
            yield i

    def slow_first(i):
        time.sleep(0.05 if i % 3 == 0 else 0.0)  # later items finish first
        finished.append(i)
        return i * i

    results = []
    for result in ordered_map(slow_first, items(), workers=3, ahead=4):
        results.append(result)
        assert len(drawn) <= len(results) + 4  # never more than `ahead` drawn beyond those consumed
    assert results == [i * i for i in range(8)]
    assert finished != sorted(finished)  # they did run side by side


def test_ordered_map_raises_the_first_failure_in_order_and_starts_nothing_after_it():
    started = []

    def fail_at_two(i):
        started.append(i)
        if i == 2:
            raise ValueError("group 2")
        return i

    with pytest.raises(ValueError, match="group 2"):
        list(ordered_map(fail_at_two, range(100), workers=2))
    assert max(started) < 10


WORKER_MKL_THREADS = """
import ctypes, glob, os, torch
from vlmerge.merging.side_by_side import ordered_map
library = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))[0])
mkl_threads = getattr(library, "mkl_get_max_threads", None)
if mkl_threads is None:
    print("no MKL")
else:
    torch.set_num_threads(1)
    print(mkl_threads(), *ordered_map(lambda i: mkl_threads(), range(4), workers=2))
"""


def test_workers_run_mkl_on_the_callers_thread_count():
    """A fresh thread's MKL starts at the environment's count (here 2), which would split a worker's SVD between
    threads and change its last bits; each worker is set to the caller's one thread before its first group."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", WORKER_MKL_THREADS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "no MKL":
        pytest.skip("this torch is not built with MKL")
    assert done.stdout.split() == ["1"] * 5


def test_each_thread_keeps_its_own_warnings_and_others_are_shown():
    barrier = threading.Barrier(2)
    caught_by = {}
    with WarningsByThread(MergeWarning) as catcher:

        def raise_own(name: str) -> None:
            with catcher.recording() as caught:
                for i in range(3):
                    barrier.wait()  # both threads warn at the same moments
                    warnings.warn(f"{name} {i}", MergeWarning, stacklevel=1)
            caught_by[name] = caught

        threads = [threading.Thread(target=raise_own, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with pytest.warns(MergeWarning, match="outside"):
            warnings.warn("outside", MergeWarning, stacklevel=1)
    assert caught_by == {"a": ["a 0", "a 1", "a 2"], "b": ["b 0", "b 1", "b 2"]}


@pytest.mark.parametrize("method", ["tsv", "iso_cts"])
def test_a_compute_bound_merge_runs_groups_on_several_threads_with_the_bytes_of_one(tmp_path, monkeypatch, method):
    torch.manual_seed(0)
    config = model_config("micro", width=64)
    source = save_model(VLTransformer(config), tmp_path / "specific.safetensors")
    seed = save_model(VLTransformer(config.agnostic()), tmp_path / "seed.safetensors")
    seen, real = [], prepared_merge_module._merge_inputs

    def merge_inputs(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(prepared_merge_module, "_merge_inputs", merge_inputs)
    threads = torch.get_num_threads()
    files = {}
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = tmp_path / f"merged-{count}.safetensors"
            files[count] = merge_checkpoint(source, method, seed_checkpoint=seed, out=out).path.read_bytes()
            assert torch.get_num_threads() == count  # the caller's count is back
    finally:
        torch.set_num_threads(threads)
    assert files[1] == files[3]
    assert {n for _, n in seen} == {1}  # every group on one intra-op thread
    assert len({name for name, _ in seen if name.startswith("vlmerge-merge")}) > 1
