"""A conversion whose shard write fails (a full disk in FFCV's writer worker or in its parent, a
worker killed) is one error naming the shard, never a hang, and leaves a directory that a resume
finishes into the same bytes as an uninterrupted run. A timer fails a test that would hang."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.command import report
from pipeline.convert import ConvertOptions, convert
from pipeline.schema import DatasetError

OPTS = ConvertOptions(max_side=64, captions_per_image=2, shard_size=5, workers=1)
N = 12  # three shards: 5, 5, 2


class Hung(Exception):
    pass


@pytest.fixture
def deadline() -> Iterator[None]:
    """Turns a hang into a failure: the alarm's exception interrupts the parent's wait."""

    def hung(*_: object) -> None:
        raise Hung("the conversion hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)  # far beyond a loaded machine's conversion; a hang is for ever
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _jpeg(rng: np.random.Generator) -> bytes:
    h, w = rng.integers(40, 90, 2)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, bytes, list[str]]]:
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    return [(f"s{i}-{rng.integers(1 << 30)}", _jpeg(rng), [f"caption {rng.integers(1 << 20)} of {i}"]) for i in range(N)]


@pytest.fixture(scope="module")
def reference(samples: list, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    convert(samples, out, source="test", options=OPTS, progress=False)
    return _files(out)


def _files(directory: Path) -> dict[str, bytes]:
    """Everything but the manifest, whose `seconds` differs from run to run."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "manifest.json"}


def _shared_memory() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def _leaked_since(before: set[str]) -> set[str]:
    """Segments made since `before` that no other live process maps: this test's leaks, not
    those of whatever else runs on the machine meanwhile (a live owner maps its segment)."""
    others = ""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                others += maps.read_text()
    return {name for name in _shared_memory() - before if f"/dev/shm/{name}" not in others}


def _failing_flush(shard: str, make: Callable[[], BaseException | None]) -> Callable:
    """MemoryAllocator.flush_page failing while `shard` is written; FFCV's worker, forked from
    this process, inherits the replacement."""
    from ffcv.memory_allocator import MemoryAllocator

    original = MemoryAllocator.flush_page

    def flush_page(self: MemoryAllocator) -> None:
        if self.fname.endswith(f"{shard}.partial"):
            err = make()
            if err is None:
                os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
            raise err
        original(self)

    return flush_page


def _killed() -> None:
    return None


INJECTIONS = {
    "worker-enospc": ("worker", lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError, "{shard}: no space left on device"),
    "worker-eio": ("worker", lambda: OSError(errno.EIO, os.strerror(errno.EIO)), OSError, "{shard}: input/output error"),
    "worker-killed": ("worker", _killed, DatasetError, "{shard}: FFCV's writer process died (exit code -9; out of memory?)"),
    "worker-bug": ("worker", lambda: ValueError("cannot fit\nsecond line"), DatasetError, "{shard}: FFCV's writer failed: ValueError: cannot fit"),
    "parent-enospc": ("parent", lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError, "{shard}: no space left on device"),
}


@pytest.mark.parametrize("injection", list(INJECTIONS))
def test_a_failed_shard_write_is_one_error_naming_it_and_resume_gives_the_same_bytes(
    injection: str, samples: list, reference: dict[str, bytes], tmp_path: Path, monkeypatch, capfd, deadline: None
) -> None:
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    where, make, kind, line = INJECTIONS[injection]
    out = tmp_path / "out"
    shard = out / "shard-00001.beton"
    if where == "worker":
        monkeypatch.setattr(MemoryAllocator, "flush_page", _failing_flush(shard.name, make))
    else:
        original = DatasetWriter.finalize

        def finalize(self: DatasetWriter, allocations: list) -> None:
            if self.fname.endswith(f"{shard.name}.partial"):
                raise make()  # a write() on a full disk: an OSError naming no file
            original(self, allocations)

        monkeypatch.setattr(DatasetWriter, "finalize", finalize)
    before = _shared_memory()
    with pytest.raises(kind) as caught:
        convert(samples, out, source="test", options=OPTS, progress=False)
    assert capfd.readouterr().err == ""  # the worker printed no traceback of its own
    code = report(caught.value)
    assert capfd.readouterr().err == f"slip: error: {line.format(shard=shard)}\n"
    assert code == (1 if kind is OSError else 2)
    # The first shard is kept, listed; the failed one left nothing, FFCV's shared memory is freed.
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.beton", "shard-00000.ids", "skipped.jsonl"]
    assert _leaked_since(before) == set()

    monkeypatch.undo()  # space freed
    convert(samples, out, source="test", options=OPTS, progress=False, resume=True)
    assert _files(out) == reference


def test_too_little_free_space_for_the_shards_jpegs_fails_before_ffcv_runs(samples: list, tmp_path: Path, monkeypatch) -> None:
    from ffcv.writer import DatasetWriter

    import pipeline.shard_writer

    jpegs = sum(len(s[1]) for s in samples[: OPTS.shard_size])
    monkeypatch.setattr(pipeline.shard_writer, "free_bytes", lambda directory: jpegs // 2)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("FFCV's writer ran")

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", never)
    out = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        convert(samples, out, source="test", options=OPTS, progress=False)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(out / "shard-00000.beton"))
    assert not out.exists()  # created by this run, and nothing in it worth resuming


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, where mounting one is permitted (root, outside most sandboxes)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_error_and_leaves_nothing(samples: list, full_disk: Path, capfd, deadline: None) -> None:
    out = full_disk / "out"
    with pytest.raises(OSError) as caught:
        convert(samples, out, source="test", options=OPTS, progress=False)
    assert capfd.readouterr().err == ""
    assert report(caught.value) == 1
    assert capfd.readouterr().err == f"slip: error: {out / 'shard-00000.beton'}: no space left on device\n"
    assert list(full_disk.iterdir()) == []


_INJECTED_MAIN = """
import errno, os, sys
from ffcv.memory_allocator import MemoryAllocator

def flush_page(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

MemoryAllocator.flush_page = flush_page  # inherited by FFCV's forked writer worker
from slip.main import main
sys.exit(main(sys.argv[1:]))
"""


def _slip(*args: str, inject: bool) -> subprocess.CompletedProcess:
    code = _INJECTED_MAIN if inject else "import sys; from slip.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "CI": "true"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_slip_convert_on_a_full_disk_exits_1_with_one_line_and_then_resumes(samples: list, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, (_, data, captions) in enumerate(samples[:4]):
        (images / f"{i}.jpg").write_bytes(data)
        (images / f"{i}.txt").write_text("\n".join(captions))
    out = tmp_path / "out"
    args = ["convert", "folder", "--images", str(images), "--out", str(out), "--workers", "1", "--max-side", "64"]
    failed = _slip(*args, inject=True)
    assert failed.returncode == 1
    assert failed.stderr == f"slip: error: {out / 'shard-00000.beton'}: no space left on device\n"
    assert not out.exists()
    done = _slip(*args, "--resume", inject=False)  # after freeing space: the same command goes on
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.beton", "shard-00000.ids", "skipped.jsonl"]
