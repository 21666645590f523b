"""One intra-op thread wherever vlmerge's output bytes must not depend on the machine."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the caller's count (also usable as a decorator).

    MKL's solves and SVDs, and torch's reductions, split their work by the thread count and sum the
    parts in another order, so their last bits depend on it (a float64 solve of a 256-wide system
    already differs between 1 and 2 threads). One thread makes merges and statistics give the same
    bytes on every machine; a caller's own setting is left as it was afterwards."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
