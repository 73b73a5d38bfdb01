"""Shared test set-up: tiers are marked so CI runs all and a developer can pick."""
import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

# Tests never reach a GPU by accident, and never wait on a progress bar.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CI", "true")
os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer and DeepSpeed draw bars of their own

# The session's temp directory, its own so that what its runs leave there can be told apart from
# what other processes on the machine write to /tmp: every test process (this one, and through
# TMPDIR its subprocesses and launched ranks) writes there, and it is removed when the session ends.
_SESSION_PREFIX = "slipstream-tests-"
_TEMP_ROOT = Path(tempfile.gettempdir())


def _remove_stale_session_dirs() -> None:
    """Sessions killed before their end (SIGKILL) left their directory; its pid names it."""
    for old in _TEMP_ROOT.glob(f"{_SESSION_PREFIX}*-*"):
        pid = old.name[len(_SESSION_PREFIX) :].split("-")[0]
        with contextlib.suppress(ValueError, PermissionError):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(old, ignore_errors=True)


_remove_stale_session_dirs()
SESSION_TMP = Path(tempfile.mkdtemp(prefix=f"{_SESSION_PREFIX}{os.getpid()}-"))
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(_TEMP_ROOT))  # pytest's tmp_path stays where it always was
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = str(SESSION_TMP)

# What a run must not leave behind, however it ends: DeepSpeed's shared-memory all-reduce buffers
# (RAM: 66 MB a rank; trainer/engine.py) and the sources DALI's conditionals generate
# (pipeline/autograph_files.py). Other runs on the machine may make such buffers meanwhile: a
# buffer is this session's when a process that maps it carries the session's mark, which every
# process the tests start inherits through its environment.
SHM = Path("/dev/shm")
DS_SHM_BUFFERS = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
AUTOGRAPH_FILES = "__autograph_generated_file*.py"
os.environ["SLIPSTREAM_TEST_SESSION"] = str(os.getpid())
SESSION_MARK = f"SLIPSTREAM_TEST_SESSION={os.getpid()}".encode()


def _shm_buffers() -> set[str]:
    return {p.name for p in SHM.glob(DS_SHM_BUFFERS)} if SHM.is_dir() else set()


def _mapped_by_this_session(name: str) -> bool | None:
    """Whether a process of this session maps /dev/shm/`name`; None while no process maps it."""
    mapped = None
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if f"/dev/shm/{name}" in maps.read_text():
                mapped = False
                if SESSION_MARK in (maps.parent / "environ").read_bytes().split(b"\0"):
                    return True
    return mapped


class _ShmWatch(threading.Thread):
    """Tells which new shared-memory buffers this session's processes made (a creator maps its
    buffer for its whole life), whatever else runs on the machine."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.before, self.decided, self.ours = _shm_buffers(), set(), set()
        self.unmapped: dict[str, int] = {}  # polls that found no process mapping the buffer
        self.done = threading.Event()

    def poll(self) -> None:
        for name in _shm_buffers() - self.before - self.decided:
            mine = _mapped_by_this_session(name)
            self.unmapped[name] = self.unmapped.get(name, 0) + (mine is None)
            # A buffer nobody maps for a few polls was left by a process already gone: not
            # attributable, so not scanned for again (each scan reads every process's maps).
            if mine is not None or self.unmapped[name] >= 4:
                self.decided.add(name)
            if mine:
                self.ours.add(name)

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.poll()


@pytest.fixture(scope="session", autouse=True)
def _runs_leave_no_debris():
    """Fails the session when its runs left shared-memory buffers or generated files behind."""
    watch = _ShmWatch()
    watch.start()
    yield
    watch.done.set()
    watch.join()
    watch.poll()
    left = sorted(SHM / name for name in watch.ours if (SHM / name).exists()) + sorted(SESSION_TMP.rglob(AUTOGRAPH_FILES))
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
    if left:
        pytest.fail(f"the tests' runs left {len(left)} files behind: {', '.join(map(str, left[:4]))}", pytrace=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _cuda():
    # The triton loss backend's kernels run under Triton's interpreter: the code the GPU
    # compiles, executed on the CPU. Read when the kernels are defined, so set first.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (multi-process, end to end)")
    config.addinivalue_line("markers", "distributed: spawns several processes with a gloo group")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_shapes_beton():
    """Builds a small converted shapes dataset under a directory: the common test input."""
    from pathlib import Path

    from pipeline import demo_dataset as shapes
    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import folder

    def make(root: Path, *, seed: int = 0, train_size: int = 32, shard_size: int = 10_000) -> Path:
        spec = shapes.ShapesSpec(seed=seed, train_size=train_size, zeroshot_per_class=1)
        raw = shapes.generate(root / "raw", spec, progress=False)
        options = ConvertOptions(max_side=64, captions_per_image=4, shard_size=shard_size, workers=1)
        convert(folder.iter_samples(raw / "train"), root / "beton", source="folder", options=options, progress=False)
        return root / "beton"

    return make


@pytest.fixture(autouse=True)
def _torch_threads_stay_put():
    """Importing ffcv sets torch's thread count to 1 for the whole process; a test that imports
    it must not make later in-process training slower, or numerically unlike a subprocess's."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
