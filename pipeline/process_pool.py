"""An ordered map over forked worker processes, with bounded memory and no silent hangs: what
conversion runs its samples through."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import gc
import itertools
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

CHUNK = 16  # items per task sent to a worker: amortises the inter-process round trip
WINDOW = 4  # chunks in flight per worker
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def fork_safe() -> Iterator[None]:
    """Fork children that never garbage-collect what they inherit.

    A forked child that collects an inherited object whose finaliser touches the parent's
    threads (a DALI pipeline's does) segfaults, and FFCV's writer then waits for it forever.
    Collect in the parent first, then freeze the survivors out of the children's collector.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _die_with_parent(parent: int) -> None:
    """Pool worker initialiser: a converter killed with SIGKILL must not leave its workers behind,
    blocked forever on a queue whose other end is gone (and holding the caller's pipes open)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: workers then end when the queue breaks, as before
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _apply(chunk: list[Any], fn: Callable[[Any], Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn(item) for every item, in order, from `workers` forked processes (in this one for one
    worker). `fn` must be picklable and should return its failures rather than raise them.

    At most WINDOW chunks per worker are in flight, so memory stays bounded on any number of
    items; a worker that dies (killed for memory, a crash in a native decoder) raises
    BrokenProcessPool instead of leaving the caller waiting forever, as multiprocessing.Pool would.
    """
    if workers <= 1:
        yield from (fn(item) for item in items)
        return
    items = iter(items)
    chunks = iter(lambda: list(itertools.islice(items, CHUNK)), [])
    work = functools.partial(_apply, fn=fn)
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))
    with fork_safe(), pool:
        window: collections.deque[Future] = collections.deque()
        for chunk in chunks:
            window.append(pool.submit(work, chunk))
            if len(window) >= WINDOW * workers:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()
