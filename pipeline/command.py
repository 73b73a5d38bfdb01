"""What every command does the same way, whichever entry point runs it (`slip`, or the
launcher's `trainer.train`): quiet progress bars under CI, and a failure on its user's input
reported in one line naming the file, sample or key, never a traceback."""
from __future__ import annotations

import os
import sys

# Raised for bad input by every layer (ConfigError, DatasetError and SourceError are ValueErrors).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)

EXIT_USER_ERROR = 2


def quiet_under_ci() -> None:
    if os.environ.get("CI") == "true":
        os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's and DeepSpeed's own bars too


def one_line(err: BaseException) -> str:
    """The first line of the error's message, or its type when it has none."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def report(err: BaseException, prog: str = "slip") -> int:
    """Print `prog: error: <one line>` on stderr and return the exit code; SLIP_DEBUG=1 re-raises instead."""
    if os.environ.get("SLIP_DEBUG"):
        raise err
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USER_ERROR
