"""Merge groups side by side on the caller's cores and get the same bytes as one after another.

Each group is merged on one intra-op thread (`core.threads.one_thread`, set once for the whole
process, then applied to each worker as it starts), so its bytes do not depend on the machine;
several groups run at once on Python threads, which torch's kernels let run in parallel (they
release the GIL). Results come back in the groups' order, and at most 4 groups per worker are in
memory beyond the one being consumed.

`warnings.catch_warnings` swaps one process-wide hook, so it cannot tell one thread's warnings from
another's: `WarningsByThread` installs one hook for all of them and files each warning under the
thread that raised it, so every group keeps exactly its own messages.
"""

import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    fn: Callable[[Item], Result], items: Iterable[Item], workers: int, ahead: int | None = None
) -> Iterator[Result]:
    """fn over `items` on `workers` threads, results in the items' order. The items are drawn in the
    caller's thread (reading stays in order), at most `ahead` of them (default 4 per worker) beyond the
    result consumed: a window as wide as the workers would keep them in step, idle beside a slow item
    while the cheap ones after it (a layer's biases and norms between its matrices) wait their turn."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = max(ahead or 4 * workers, workers)
    # A new thread starts with MKL's and OpenMP's own count (the environment's), not the process's: torch
    # applies its count to a thread only at its first kernel large enough to split, so an SVD or product before
    # that would run on the environment's threads, and its last bits would follow them.
    count = torch.get_num_threads()
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="vlmerge-merge", initializer=torch.set_num_threads, initargs=(count,)
    ) as pool:
        pending: deque[Future[Result]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early, or a group failed: start nothing more
            for future in pending:
                future.cancel()


class WarningsByThread:
    """Within `with`, warnings of `category` are always issued (never deduplicated), and those a thread
    raises inside its `recording()` block go to that block's list; warnings outside any block are
    shown as usual."""

    def __init__(self, category: type[Warning]) -> None:
        self._category = category
        self._local = threading.local()
        self._catcher = warnings.catch_warnings()

    def __enter__(self) -> "WarningsByThread":
        self._catcher.__enter__()
        warnings.simplefilter("always", self._category)
        self._shown = warnings.showwarning
        warnings.showwarning = self._file
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._catcher.__exit__(*exc_info)

    @contextmanager
    def recording(self) -> Iterator[list[str]]:
        """The messages of `category` this thread raises inside the block, in order."""
        caught: list[str] = []
        self._local.caught = caught
        try:
            yield caught
        finally:
            self._local.caught = None

    def _file(self, message, category, filename, lineno, file=None, line=None) -> None:
        caught = getattr(self._local, "caught", None)
        if caught is None:
            self._shown(message, category, filename, lineno, file, line)
        elif issubclass(category, self._category):
            caught.append(str(message))
        # other categories raised inside a group were swallowed before groups ran side by side: still are
