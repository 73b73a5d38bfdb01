"""What every command does the same way, whichever entry point runs it (`slip`, or the
launcher's `trainer.train`): quiet progress bars under CI, and a failure reported in one line
on stderr naming the file, sample or key, never a traceback.

Two kinds of failure are reported, with two exit codes:
- 2 (argparse's own code for a bad command line): the user's input is wrong: a bad value or
  key, a malformed file, or a path that cannot be what was meant (no such file, a parent that
  is a file, a name too long for the filesystem, a directory where a file must be).
- 1: the operating system refused an operation on a well-formed request: permission denied,
  read-only file system, no space left on device, I/O error. Retrying elsewhere or after
  freeing space can succeed with the same command.
An OS error is printed as `<path>: <what failed>`, from its errno, so that it reads the same
whichever library raised it.
"""
from __future__ import annotations

import errno
import os
import re
import select
import sys
from pathlib import Path

# Reported in one line instead of a traceback: bad input from every layer (ConfigError,
# DatasetError and SourceError are ValueErrors), and any OSError (FileNotFoundError and the other
# path errors are OSErrors too): both entry points catch this tuple.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

EXIT_USER_ERROR = 2
EXIT_OS_ERROR = 1

# The errnos that mean the path given is wrong, rather than that the system refused a right one.
_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL})

# What failed, as the one line says it; any other errno reads as its strerror, lower-cased.
_WHAT_FAILED = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
}

# How str(OSError) spells one that a process boundary turned into text (a DataLoader worker's).
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] [^:]*(?::\s*'(.*?)'(?: -> '(.*)')?)?$")


def quiet_under_ci() -> None:
    if os.environ.get("CI") == "true":
        os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's and DeepSpeed's own bars too


def _original_line(message: str) -> str:
    """The line that says what went wrong. An error re-raised from a torch DataLoader worker
    carries the worker's whole traceback as its message ("Caught OSError in DataLoader worker
    process 0." first); the original error is its last line, "OSError: [Errno 5] ..."."""
    lines = [line for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    if "Original Traceback" in message:
        return re.sub(r"^[\w.]+: ", "", lines[-1].strip(), count=1)  # drop the type name
    return lines[0]


def what_failed(code: int) -> str:
    return _WHAT_FAILED.get(code) or os.strerror(code).lower()


def _errno_and_names(err: OSError) -> tuple[int | None, list[str]]:
    """The error's errno and the paths it names; read back from its text when a process
    boundary kept only that (a DataLoader worker's error arrives as a message)."""
    if err.errno is not None:
        names = [n for n in (err.filename, err.filename2) if n is not None]
        return err.errno, [os.fsdecode(n) if isinstance(n, bytes) else str(n) for n in names]
    match = _ERRNO_TEXT.search(_original_line(str(err)))
    if match is None:
        return None, []
    return int(match[1]), [n for n in (match[2], match[3]) if n]


def describe_os_error(err: OSError) -> str | None:
    """`<path>: <what failed>` (`<path> -> <other path>: ...` for a rename or link), or
    `<what failed>` when the error names no file; None when `err` carries no errno (a
    library's own message, such as PIL's, which is shown as it is)."""
    code, names = _errno_and_names(err)
    if code is None:
        return None
    what = what_failed(code)
    if code == errno.ENOTDIR and names:
        # The path has a file where a folder must be; which one is rarely the last name.
        blocker = next((p for p in Path(names[0]).parents if p.exists() and not p.is_dir()), None)
        what = f"{what}: {blocker} is a file" if blocker is not None else what
    elif code == errno.EEXIST and names and Path(names[0]).exists() and not Path(names[0]).is_dir():
        what = f"{what} as a file"  # mkdir(exist_ok=True) on a file: "already exists" alone reads as if all were well
    return f"{' -> '.join(names)}: {what}" if names else what


def one_line(err: BaseException) -> str:
    """One line saying what failed: an OS error's path and cause, else the first line of the
    error's message (the original error's, for one re-raised from a worker), else its type."""
    if isinstance(err, OSError):
        described = describe_os_error(err)
        if described is not None:
            return described
    return _original_line(str(err)) or type(err).__name__


def exit_code(err: BaseException) -> int:
    """1 when the operating system refused (an errno other than a wrong path's), else 2."""
    code = _errno_and_names(err)[0] if isinstance(err, OSError) else None
    return EXIT_OS_ERROR if code is not None and code not in _PATH_ERRNOS else EXIT_USER_ERROR


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE


def _stdout_is_broken() -> bool:
    """Whether the reader of our stdout has gone (`slip inspect D | head`): a pipe's write end
    polls as an error then. Any other broken pipe (a worker's, a socket's) is a real failure."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # stdout captured or closed: not a pipe we own
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def report(err: BaseException, prog: str = "slip") -> int:
    """Print `prog: error: <one line>` on stderr and return the exit code; SLIP_DEBUG=1 re-raises instead."""
    if os.environ.get("SLIP_DEBUG"):
        raise err
    if isinstance(err, BrokenPipeError) and _stdout_is_broken():
        # The reader has what it wanted: say nothing, as a SIGPIPE'd tool would, and keep the
        # interpreter's final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return exit_code(err)
