"""The learning-rate schedule as a pure function of the global step, so resume is exact."""
from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, total: int, warmup: int, peak: float, start: float, end: float) -> float:
    """Linear warm-up from `start` to `peak` over `warmup` steps, then cosine down to `end` at `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepPlan:
    total: int
    warmup: int
    steps_per_epoch: int


def plan_steps(epochs: float, warmup_epochs: float, steps: int, steps_per_epoch: int) -> StepPlan:
    """Total and warm-up steps: `steps` when set, else whole epochs of the sampler."""
    total = steps or max(1, round(epochs * steps_per_epoch))
    return StepPlan(total, min(total, round(warmup_epochs * steps_per_epoch)), steps_per_epoch)
