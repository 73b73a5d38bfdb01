"""Per-step metrics: JSON lines, TensorBoard scalars and optionally Weights & Biases; rank 0 writes.

A resumed run continues the same files: records at or after the step it resumes from (written
after the checkpoint it resumes from, by the run that died) are dropped first, so every step
appears once and the curves have no doubled segment.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import write_text_atomic


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, peak RSS on the CPU."""
    from kernels.peak_memory import peak_bytes

    return peak_bytes(device)


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
