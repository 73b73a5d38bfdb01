"""A reader that stops early (`slip inspect D | head`) is not an error; any other broken pipe is."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# The child's stdout is a pipe whose reader is closed (as after `| head`), or an open one.
SCRIPT = """
import os, sys
from pipeline.command import report
if sys.argv[1] == "closed":
    r, w = os.pipe()
    os.dup2(w, 1)
    os.close(r)
sys.exit(report(BrokenPipeError(32, "Broken pipe")))
"""


def _run(stdout: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, stdout], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_stdout_whose_reader_left_ends_quietly() -> None:
    proc = _run("closed")
    assert proc.returncode == 128 + 13 and proc.stderr == ""


def test_another_broken_pipe_is_reported_in_one_line() -> None:
    proc = _run("open")  # a worker's or a socket's pipe broke, not our stdout
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "broken pipe" in proc.stderr
