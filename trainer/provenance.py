"""What produced a run: code revision, package versions, the exact data files."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic

PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda120", "ffcv", "deepspeed", "timm", "open_clip_torch", "numpy")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_provenance(path: Path, manifest: dict[str, Any]) -> None:
    record = {
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "data": {"source": manifest.get("source"), "samples": manifest.get("samples"), "shards": manifest.get("shards")},
    }
    write_json_atomic(path, record)
