"""The source files DALI's conditionals leave in the temp directory, removed as soon as they are loaded.

A graph defined with `enable_conditionals=True` goes through DALI's copy of autograph, which
writes each function it converts to a `__autograph_generated_file*.py` in the temp directory,
imports it, and deletes it at interpreter exit. A process that ends otherwise (a signal's
default action, SIGKILL, os._exit, a launcher's kill) leaves them behind, about fourteen a
process. Once imported, a module needs its file only for the source lines of tracebacks and
`inspect`; linecache keeps those instead, and DALI's own removal at exit finds nothing to do.
"""
from __future__ import annotations

import contextlib
import linecache
import os
import sys

PREFIX = "__autograph_generated_file"


def forget_generated_files() -> int:
    """Delete the files of this process's autograph modules (their source kept in linecache);
    how many were deleted. Other processes' files are never touched: only modules this
    interpreter imported are looked at."""
    removed = 0
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith(PREFIX) or not path or not os.path.exists(path):
            continue
        with contextlib.suppress(OSError):
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            # An entry without a modification time is never checked against the (absent) file.
            linecache.cache[path] = (sum(map(len, lines)), None, lines, path)
            os.remove(path)
            removed += 1
    return removed
