"""The operating system refusing a write: one line naming the path and what failed, a non-zero
exit, and nothing half-written, for every verb that writes (convert --out, export --out,
inspect --png, train's run.out).

Tests run as root in CI, where chmod stops no write, so a read-only file system and a full disk
are made by failing the system calls a real one fails (open for writing, mkdir), with the errno
the kernel gives; a parent that is a file and a name over 255 bytes are real.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import command
from pipeline.atomic import as_os_error, replacing, write_text_atomic
from slip.main import main

LONG_NAME = "n" * 300  # over NAME_MAX (255 bytes) on every Linux filesystem


class _FillsDisk(io.RawIOBase):
    """A file on a disk with a few bytes left: part of the first write lands, then ENOSPC, as
    write(2) reports it (no file name)."""

    def __init__(self, real, room: int = 16) -> None:
        self.real, self.room = real, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.real.write(bytes(data[: self.room]))
            self.real.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def close(self) -> None:
        self.real.close()
        super().close()

    def writable(self) -> bool:
        return True


def fake_filesystem(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Under `root`, open-for-writing and mkdir fail as on a read-only file system (EROFS), or
    writes fill the disk (ENOSPC). Reads, and everything outside `root`, are untouched."""
    real_open, real_mkdir = builtins.open, os.mkdir
    inside = lambda p: isinstance(p, (str, os.PathLike)) and Path(os.fspath(p)).resolve().is_relative_to(root.resolve())  # noqa: E731

    def fake_open(file, mode="r", *args, **kwargs):
        if not (inside(file) and any(c in mode for c in "wax+")):
            return real_open(file, mode, *args, **kwargs)
        if code == errno.ENOSPC:
            if "b" in mode:
                return _FillsDisk(real_open(file, mode, *args, **kwargs))
            raw = _FillsDisk(real_open(file, mode.replace("t", "") + "b", buffering=0))
            return io.TextIOWrapper(io.BufferedWriter(raw), encoding=kwargs.get("encoding"), newline=kwargs.get("newline"))
        raise OSError(code, os.strerror(code), os.fspath(file))

    def fake_mkdir(path, mode=0o777, *args, **kwargs):
        if code == errno.EROFS and inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's open
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def one_error_line(capsys: pytest.CaptureFixture, library_logs: bool = False) -> str:
    """The one line of stderr; with `library_logs`, the one line of ours among what DeepSpeed
    and torch log there while training starts."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not library_logs or line.startswith("slip")]
    assert len(lines) == 1 and lines[0].startswith("slip: error: ") and "Traceback" not in err, err
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    """Temporaries and partial files anywhere under `directory`."""
    return sorted(str(p) for p in directory.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial"))


# --- the one line ---------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "what", "exit_code"), [
    (errno.EACCES, "permission denied", 1),
    (errno.EPERM, "permission denied (operation not permitted)", 1),
    (errno.EROFS, "read-only file system", 1),
    (errno.ENOSPC, "no space left on device", 1),
    (errno.EDQUOT, "disk quota exceeded", 1),
    (errno.EIO, "input/output error", 1),
    (errno.ENAMETOOLONG, "file name too long", 2),
    (errno.ENOENT, "no such file or directory", 2),
    (errno.EISDIR, "is a directory", 2),
    (errno.EEXIST, "already exists", 2),
])  # fmt: skip
def test_an_os_error_is_one_line_naming_the_path(code: int, what: str, exit_code: int, capsys: pytest.CaptureFixture) -> None:
    path = f"/data/run-{np.random.default_rng().integers(1 << 30)}/out.bin"
    assert command.report(OSError(code, os.strerror(code), path)) == exit_code
    assert one_error_line(capsys) == f"slip: error: {path}: {what}"


def test_a_rename_names_both_paths_and_an_unnamed_error_says_what_failed(capsys: pytest.CaptureFixture) -> None:
    assert command.report(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a/x", None, "/b/x")) == 1
    assert one_error_line(capsys) == "slip: error: /a/x -> /b/x: invalid cross-device link"
    assert command.report(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == 1
    assert one_error_line(capsys) == "slip: error: no space left on device"
    assert command.report(OSError("cannot identify image file 'x.jpg'")) == 2  # a library's message, no errno: input
    assert one_error_line(capsys) == "slip: error: cannot identify image file 'x.jpg'"


def test_a_parent_that_is_a_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_bytes(os.urandom(8))
    with pytest.raises(OSError) as raised:
        write_text_atomic(tmp_path / "afile" / "sub" / "x.json", "{}")
    assert command.report(raised.value) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"slip: error: {tmp_path / 'afile'}") and line.endswith(f"not a directory: {tmp_path / 'afile'} is a file")


class _RaisesInWorker(torch.utils.data.Dataset):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise self.error


@pytest.mark.parametrize("error", [OSError(errno.EIO, os.strerror(errno.EIO), "/data/shard-00003.beton"), ValueError("sample 7: bad caption")])
def test_an_error_from_a_dataloader_worker_is_still_one_line(error: BaseException, capsys: pytest.CaptureFixture) -> None:
    """torch re-raises a worker's error as the same type with the worker's traceback as its
    message, and drops the errno: the line still names the file and the cause."""
    with pytest.raises(type(error)) as raised:
        next(iter(torch.utils.data.DataLoader(_RaisesInWorker(error), num_workers=1)))
    code = command.report(raised.value)
    if isinstance(error, OSError):
        assert (code, one_error_line(capsys)) == (1, "slip: error: /data/shard-00003.beton: input/output error")
    else:
        assert (code, one_error_line(capsys)) == (2, "slip: error: sample 7: bad caption")


# --- whole or not at all --------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_replacing_names_the_target_and_keeps_the_old_file(code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "weights.bin"
    target.parent.mkdir()
    old = os.urandom(64)
    target.write_bytes(old)
    fake_filesystem(monkeypatch, tmp_path / "out", code)
    with pytest.raises(OSError) as raised, replacing(target) as tmp:
        tmp.write_bytes(os.urandom(4096))
    monkeypatch.undo()
    assert (raised.value.errno, raised.value.filename) == (code, str(target))  # the target, never the temporary
    assert target.read_bytes() == old and leftovers(tmp_path) == []


def test_library_errors_that_hide_an_errno_become_os_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.safetensors"
    # safetensors' SafetensorError, word for word from a read-only file system:
    rust = RuntimeError(f'Error while serializing: I/O error: Read-only file system (os error 30) at path "{tmp_path}/.tmpU2QnZz"')
    mapped = as_os_error(rust, target)
    assert (mapped.errno, mapped.filename) == (errno.EROFS, str(target))
    # torch.save on a full disk: RuntimeError("... unexpected pos ..."), no errno anywhere.
    zipped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert as_os_error(zipped, target) is None  # the disk has room: not an OS error
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255)))
    mapped = as_os_error(zipped, target)
    assert (mapped.errno, mapped.filename) == (errno.ENOSPC, str(target))


def test_files_get_the_umask_s_mode_not_a_writer_s(tmp_path: Path) -> None:
    from trainer.weights import write_weights

    before = os.umask(0o027)
    try:
        write_weights({"w": torch.randn(3, 4)}, tmp_path / "new.safetensors", {"k": 1})  # safetensors alone makes 0600
        assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o604)
        write_text_atomic(kept, '{"a": 1}')  # a replaced file keeps the mode it had
        assert kept.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(before)


def test_a_name_near_the_limit_still_gets_a_temporary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fits = tmp_path / ("x" * 250)  # the temporary's suffixes would take it over 255 bytes
    write_text_atomic(fits, "ok")
    assert fits.read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == [fits.name]
    with pytest.raises(OSError) as raised:
        write_text_atomic(tmp_path / LONG_NAME, "no")
    assert command.report(raised.value) == 2
    assert one_error_line(capsys) == f"slip: error: {tmp_path / LONG_NAME}: file name too long"


# --- the verbs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
        (root / f"{i}.txt").write_text(f"a photo of thing {i}\n")
    return root


def _convert(images: Path, out: Path) -> int:
    return main(["convert", "folder", "--images", str(images), "--out", str(out), "--workers", "1", "--max-side", "48"])


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_convert_out_on_a_refusing_filesystem(code: int, images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    fake_filesystem(monkeypatch, disk, code)
    assert _convert(images, disk / "out") == 1
    monkeypatch.undo()
    line = one_error_line(capsys)
    assert line.startswith(f"slip: error: {disk / 'out'}") and line.endswith(command.what_failed(code))
    assert leftovers(tmp_path) == []


def test_convert_out_with_a_bad_path(images: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_bytes(os.urandom(8))
    assert _convert(images, tmp_path / "afile" / "out") == 2
    assert one_error_line(capsys) == f"slip: error: {tmp_path / 'afile' / 'out'}: not a directory: {tmp_path / 'afile'} is a file"
    assert _convert(images, tmp_path / LONG_NAME) == 2
    line = one_error_line(capsys)  # the directory, or the first file convert looks for in it
    assert line.startswith(f"slip: error: {tmp_path / LONG_NAME}") and line.endswith(": file name too long")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    out = tmp_path_factory.mktemp("beton") / "d"
    assert _convert(images, out) == 0
    return out


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_inspect_png_on_a_refusing_filesystem(code: int, dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    png = tmp_path / "sheet.png"
    fake_filesystem(monkeypatch, tmp_path, code)
    assert main(["inspect", str(dataset), "--grid", "4", "--png", str(png)]) == 1
    monkeypatch.undo()
    assert one_error_line(capsys) == f"slip: error: {png}: {command.what_failed(code)}"
    assert list(tmp_path.iterdir()) == []


def test_inspect_png_with_a_bad_path(dataset: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_bytes(os.urandom(8))
    assert main(["inspect", str(dataset), "--grid", "4", "--png", str(tmp_path / "afile" / "sheet.png")]) == 2
    assert one_error_line(capsys).endswith(f"not a directory: {tmp_path / 'afile'} is a file")
    assert main(["inspect", str(dataset), "--grid", "4", "--png", str(tmp_path / f"{LONG_NAME}.png")]) == 2
    assert one_error_line(capsys) == f"slip: error: {tmp_path / LONG_NAME}.png: file name too long"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as training leaves it: config.yaml and one complete checkpoint."""
    from trainer.build import init_model
    from trainer.checksums import write_manifest
    from trainer.config import load_config
    from trainer.weights import write_weights

    cfg = load_config("tiny_cpu")
    run = tmp_path_factory.mktemp("run") / "r"
    ckpt = run / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (ckpt / "meta.json").write_text('{"step": 1, "world": 1}')
    write_weights(init_model(cfg).state_dict(), ckpt / "model.safetensors", cfg.to_dict())
    write_manifest(ckpt)  # the checksums that make it intact
    (run / "checkpoints" / "latest").write_text("step-00000001\n")
    return run


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_export_out_on_a_refusing_filesystem(code: int, run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """safetensors writes from Rust, past Python's open: its own error text is what the
    filesystem's refusal looks like (read-only: creating its temporary fails; full: it
    removes its temporary and reports the errno)."""
    import safetensors
    import safetensors.torch

    out = tmp_path / "model.safetensors"
    old = os.urandom(64)
    out.write_bytes(old)

    def refused(tensors, filename, metadata=None):
        Path(filename).write_bytes(os.urandom(32))  # what a writer leaves before it fails
        where = f' at path "{Path(filename).parent}/.tmpAbC123"' if code == errno.EROFS else ""
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code}){where}")

    monkeypatch.setattr(safetensors.torch, "save_file", refused)
    monkeypatch.setattr("trainer.weights.save_file", refused)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 1
    assert one_error_line(capsys) == f"slip: error: {out}: {command.what_failed(code)}"
    assert out.read_bytes() == old and leftovers(tmp_path) == []


def test_export_out_with_a_bad_path(run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_bytes(os.urandom(8))
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "afile" / "m.safetensors")]) == 2
    afile = tmp_path / "afile"
    assert one_error_line(capsys) in (f"slip: error: {afile / 'm.safetensors'}: not a directory: {afile} is a file",
                                      f"slip: error: {afile}: already exists as a file")  # fmt: skip
    assert main(["export", str(run), "--out", str(tmp_path / f"{LONG_NAME}.safetensors")]) == 2
    assert one_error_line(capsys) == f"slip: error: {tmp_path / LONG_NAME}.safetensors: file name too long"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.ENOSPC])
def test_train_run_out_on_a_full_disk(code: int, tmp_path: Path, monkeypatch, capsys) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    fake_filesystem(monkeypatch, runs, code)
    args = ["train", "--config", "tiny_cpu", "data.loader=synthetic", "data.allow_synthetic=true", f"run.out={runs}", "run.name=s",
            "schedule.steps=1", "data.batch_size=8", "run.tensorboard=false"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 1
    monkeypatch.undo()
    line = one_error_line(capsys, library_logs=True)
    assert line.startswith(f"slip: error: {runs / 's'}") and line.endswith(command.what_failed(code))
    assert leftovers(tmp_path) == []

