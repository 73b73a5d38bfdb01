"""A run made to look as if it had died right after one of its checkpoints."""
from __future__ import annotations

import shutil
from pathlib import Path


def rewind(run_dir: Path, step: int) -> None:
    """Remove the checkpoints after `step` and point `latest` at it (the metrics log past it is
    truncated by the resumed run itself)."""
    checkpoints = run_dir / "checkpoints"
    for d in checkpoints.glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    (checkpoints / "latest").write_text(f"step-{step:08d}")
