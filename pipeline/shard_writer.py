"""One .beton file through FFCV's DatasetWriter, written whole or not at all, never a hang.

FFCV's writer copies the samples into the file from worker processes, and its parent waits for
them by polling a counter and then reading a queue, with no timeout and no look at the workers:
a worker that raises (a full disk, in its page flush) leaves a traceback on stderr, a
half-written file, and the parent waiting forever. For the length of one write, the names FFCV's
writer module spawns and waits with (`Process`, `Queue`, `sleep`, `tqdm`) are replaced by ones
that keep watch: a worker sends its failure up a pipe instead of printing it, and every wait of
the parent looks at the workers' exit codes, so a dead worker becomes an error in the parent,
naming the file: an OSError with the worker's errno, else a DatasetError. Any failure then
stops the other workers, frees FFCV's shared memory and removes the temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import queue
import time
from collections.abc import Iterator, Sequence
from multiprocessing.queues import Queue
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

from pipeline.atomic import naming
from pipeline.process_pool import fork_safe
from pipeline.schema import DatasetError

PARTIAL = ".partial"  # suffix of a file being written
POLL = 0.1  # seconds between looks at the workers while the parent waits on them
_FORK = multiprocessing.get_context("fork")  # the workers read the dataset they inherit: no pickling


def free_bytes(directory: Path) -> int:
    """What this process can still write under `directory` (root may use the reserved blocks too)."""
    st = os.statvfs(directory)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


class _Watch:
    """The writer's workers and queues, as the parent that started them sees them."""

    def __init__(self, path: Path) -> None:
        self.path, self.owner = path, os.getpid()
        self.workers: list[_Worker] = []
        self.queues: list[_WatchedQueue] = []

    def check(self) -> None:
        if os.getpid() != self.owner:
            return  # a worker's own waits: it inherits the replaced names, not the right to look
        for worker in self.workers:
            if worker.exitcode not in (None, 0):
                raise worker.failure(self.path)

    def process(self, *args: Any, **kwargs: Any) -> _Worker:
        worker = _Worker(*args, **kwargs)
        self.workers.append(worker)
        return worker

    def queue(self) -> _WatchedQueue:
        made = _WatchedQueue(self)
        self.queues.append(made)
        return made

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self.check()

    def stop(self) -> None:
        """Workers ended and queues let go, so neither this process nor its exit waits on them."""
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
            worker.close()
        for made in self.queues:
            made.cancel_join_thread()  # a feeder thread blocked on a dead reader would hang exit
            made.close()


class _Worker(_FORK.Process):  # type: ignore[name-defined]
    """A writer worker that hands its failure to the parent instead of printing a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._told, self._tell = _FORK.Pipe(duplex=False)  # (parent reads, worker writes)

    def run(self) -> None:
        try:
            super().run()
        except BaseException as err:
            lines = str(err).splitlines()
            self._tell.send((err.errno if isinstance(err, OSError) else None, f"{type(err).__name__}: {lines[0] if lines else ''}"))
            raise SystemExit(1) from None  # exit code 1, and multiprocessing prints nothing

    def close(self) -> None:
        super().close()
        self._told.close()
        self._tell.close()

    def failure(self, path: Path) -> Exception:
        told = self._told.recv() if self._told.poll() else None
        if told is None:
            return DatasetError(f"{path}: FFCV's writer process died (exit code {self.exitcode}; out of memory?)")
        code, what = told
        if code:
            return OSError(code, os.strerror(code), str(path))
        return DatasetError(f"{path}: FFCV's writer failed: {what}")


class _WatchedQueue(Queue):
    """A queue whose blocking get, in the parent, gives up when a worker has died."""

    def __init__(self, watch: _Watch) -> None:
        super().__init__(ctx=_FORK)
        self._watch = watch

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block or timeout is not None or os.getpid() != self._watch.owner:
            return super().get(block, timeout)
        while True:
            try:
                return super().get(timeout=POLL)
            except queue.Empty:
                self._watch.check()


class _NoBar:
    """Stands in for FFCV writer's tqdm: its unlabelled bar per file would interleave with ours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _watched(watch: _Watch) -> Iterator[None]:
    import ffcv.writer  # pipeline.ffcv_compat has imported it already, and undone its side effect

    # FFCV has no option for any of these: its module's names are what its writer calls.
    replaced = {"Process": watch.process, "Queue": watch.queue, "sleep": watch.sleep, "tqdm": _NoBar}
    saved = {name: getattr(ffcv.writer, name) for name in replaced}
    for name, value in replaced.items():
        setattr(ffcv.writer, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ffcv.writer, name, value)


def _free_shared_memory(writer: Any) -> None:
    shared = getattr(writer, "metadata_sm", None)  # made by FFCV's prepare(), unlinked only on success
    if isinstance(shared, SharedMemory):
        with contextlib.suppress(OSError):
            shared.close()
            shared.unlink()


def write_beton(path: Path, fields: dict[str, Any], dataset: Sequence[Any], *, min_bytes: int = 0, chunksize: int = 256) -> None:
    """Write `dataset` (an indexable of rows in `fields` order) to `path` with one FFCV worker,
    so that the rows lie in order and the file is reproducible. `min_bytes`: a size the file
    cannot be under; less free space than that fails before anything is written."""
    from pipeline.ffcv_compat import DatasetWriter

    path = Path(path)
    partial = path.with_name(path.name + PARTIAL)
    if min_bytes and free_bytes(path.parent) < min_bytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    watch = _Watch(path)
    writer = DatasetWriter(str(partial), fields, num_workers=1)
    try:
        with naming(path, partial):
            with fork_safe(), _watched(watch):
                writer.from_indexed_dataset(dataset, chunksize=chunksize)
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())  # whoever vouches for this file next must find it on disk
            partial.replace(path)
    except BaseException:
        watch.stop()  # before the unlink: no worker may still be writing
        _free_shared_memory(writer)
        with contextlib.suppress(OSError):  # the error to report is the write's, not the clean-up's
            partial.unlink(missing_ok=True)
        raise
    watch.stop()
