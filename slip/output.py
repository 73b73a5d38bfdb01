"""How every verb prints: a human line or table on stdout, or with --json the figures alone.

What libraries print while a verb works (DeepSpeed's logs, build messages, FFCV's bars) goes
to stderr, so stdout carries the verb's output and nothing else: `slip ... --json | jq` works.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def emit(result: Any, text: str | Callable[[], str], as_json: bool) -> None:
    """The verb's output: `result` as indented JSON, or `text` (a string, or what makes it)."""
    print(json.dumps(result, indent=2) if as_json else (text() if callable(text) else text))


def counts(by_reason: dict[str, int]) -> str:
    """`reason=n, ...` (or "none"): how skipped samples are listed."""
    return ", ".join(f"{k}={v}" for k, v in by_reason.items()) or "none"


def percent(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f}%"


def table(rows: Sequence[Sequence[str]], *, label_width: int, cell_width: int) -> list[str]:
    """Rows of a label and right-aligned cells, one line each."""
    return [f"{row[0]:{label_width}s}" + "".join(f"{cell:>{cell_width}s}" for cell in row[1:]) for row in rows]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Library output goes to stderr while the block runs, at the file-descriptor level (child
    processes included), so stdout carries only the verb's report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
