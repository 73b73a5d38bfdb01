"""Files that appear whole or not at all: written under a temporary name, then renamed.

A write that fails, whatever raised it, leaves no temporary behind and becomes an OSError
naming the file the caller asked for (not the temporary): `pipeline.command.report` then
prints it as `<path>: <what failed>`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAME_MAX = 255  # bytes in one path component on Linux's filesystems

# How Rust's std::io::Error ends its text (safetensors' SafetensorError): "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _disk_full(directory: Path) -> bool:
    """No block left for this process to write (statvfs's f_bavail counts root's reserve out)."""
    for folder in (directory, *directory.parents):
        with contextlib.suppress(OSError):
            return os.statvfs(folder).f_bavail == 0
    return False


def as_os_error(err: BaseException, path: str | Path, temporary: str | Path | None = None) -> OSError | None:
    """`err`, raised while writing `path`, as an OSError that names `path`; None when it is
    not an OS failure of that write, or already names another file.

    Writers lose the path on the way: a write() on a full disk raises an OSError with no file
    name, safetensors wraps the errno in its own error's text, and torch.save on a full disk
    raises RuntimeError("... unexpected pos ...") with no errno at all (recognised by the disk
    having no space left when it fails)."""
    path = Path(path)
    if isinstance(err, OSError):
        if err.errno is None:
            return None
        named = err.filename
        if named is None or (temporary is not None and isinstance(named, (str, bytes)) and os.fsdecode(named) == str(temporary)):
            return OSError(err.errno, os.strerror(err.errno), str(path))
        return None
    match = _RUST_OS_ERROR.search(str(err))
    if match:
        code = int(match[1])
        return OSError(code, os.strerror(code), str(path))
    if isinstance(err, RuntimeError) and _disk_full(path.parent):  # torch.save's; a ValueError stays itself
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextlib.contextmanager
def naming(path: str | Path, temporary: str | Path | None = None) -> Iterator[None]:
    """Whatever OS failure the block raises while it writes `path` (or its `temporary`) is
    re-raised as an OSError naming `path` (see `as_os_error`); other errors pass unchanged."""
    try:
        yield
    except BaseException as err:
        mapped = as_os_error(err, path, temporary)
        if mapped is None:
            raise
        raise mapped from err


def _umask() -> int:
    """This process's umask, read without setting it (os.umask only swaps, racing other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_name(path: Path, suffix: str) -> Path:
    """A hidden name beside `path`, short enough for the filesystem whenever `path`'s own is."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    if len(os.fsencode(tmp.name)) > NAME_MAX:
        digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
        tmp = path.with_name(f".tmp-{digest}-{os.getpid()}{suffix}")
    return tmp


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary name beside `path` for the caller to write; when the block ends
    normally the file is synced and renamed over `path`, and on any failure it is removed, so
    `path` holds the old file or the whole new one. `suffix` keeps an extension that a writer
    reads the format from (PIL's save).

    The file gets the mode of the one it replaces, or for a new file what open() would give it
    (0666 less the umask): some writers make theirs private (safetensors writes 0600 through a
    temporary file of its own), which would leave an export unreadable to its group."""
    path = Path(path)
    tmp = _temporary_name(path, suffix)
    try:
        with naming(path, tmp):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # on disk before the rename makes it visible: a power cut leaves old or new
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
            os.chmod(tmp, mode)
            tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error to report is the write's, not the clean-up's
            tmp.unlink(missing_ok=True)
        raise


def make_parents(path: str | Path) -> None:
    """Create `path`'s missing parent directories. One of them that exists as a file is an error
    naming `path`, not the FileExistsError mkdir gives, which reads as if all were well."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    make_parents(path)
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
