"""The learning-rate schedule as a pure function of the global step, so resume is exact."""
from __future__ import annotations

import math


def lr_at(step: int, *, total: int, warmup: int, peak: float, start: float, end: float) -> float:
    """Linear warm-up from `start` to `peak` over `warmup` steps, then cosine down to `end` at `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))
