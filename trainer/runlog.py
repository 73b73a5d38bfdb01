"""What a run leaves beside its checkpoints: per-step metrics, what produced it, its peak memory.

Metrics go to JSON lines, TensorBoard scalars and optionally Weights & Biases; rank 0 writes.
A resumed run continues the same files: records at or after the step it resumes from (written
after the checkpoint it resumes from, by the run that died) are dropped first, so every step
appears once and the curves have no doubled segment.

Provenance: the code revision, package versions and the exact data files. Peak memory: the
CUDA allocator's on a GPU, the resident set's high-water mark on the CPU; both can be reset, so
a peak belongs to what ran after the reset and not to an import that briefly held hundreds of
MB (getrusage's ru_maxrss never goes down).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import write_json_atomic, write_text_atomic

PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda120", "ffcv", "deepspeed", "timm", "open_clip_torch", "numpy")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM to the current resident set
    except OSError:
        pass  # no procfs: the peak is then the process's so far


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes(device: torch.device) -> int:
    """Peak memory of this process since the last reset_peak (or since it started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


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


def _truncate_jsonl(path: Path, first_step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < first_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by the crash: nothing after it is trustworthy
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "slipstream",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if start_step > 0:
            _truncate_jsonl(path, start_step)
        self._file = open(path, "a" if start_step > 0 else "w", buffering=1)  # line-buffered: a crash loses one record
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides earlier events from this step on: a dead run's, or a whole
            # earlier run's when this one starts afresh in the same directory.
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        if wandb:
            import wandb as wandb_module

            if start_step > 0 and (run_dir / "wandb_id").is_file():
                # Rewound to the resumed step: W&B drops steps below the highest it has seen,
                # which the dead run pushed past the checkpoint.
                kwargs = {"resume_from": f"{_wandb_id(run_dir, fresh=False)}?_step={start_step}"}
            else:
                kwargs = {"id": _wandb_id(run_dir, fresh=True)}
            self._wandb = wandb_module.init(project=wandb_project, name=run_dir.name, dir=str(run_dir), config=config, **kwargs)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(run_dir: Path, *, fresh: bool) -> str:
    """One W&B run per run directory across resumes; a run started afresh gets a new one."""
    path = run_dir / "wandb_id"
    if path.is_file() and not fresh:
        return path.read_text().strip()
    run_id = os.urandom(8).hex()
    write_text_atomic(path, run_id)
    return run_id
