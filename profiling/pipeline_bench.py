"""Input-pipeline speed, side by side: slipstream's DALI loader against the SLIP reference's PIL pipeline.

Both read the same converted dataset with the same number of CPU workers/threads and produce
the same views; samples/s counts samples (each with all its views) handed to the caller.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from pipeline.augment_config import AugmentConfig
from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler
from profiling.pil_pipeline import pil_loader


def _rate(batches: Iterator[Any], batch_size: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - start)


def _forever(loader) -> Iterator[Any]:
    while True:
        yield from loader


def compare_pipelines(
    data: str,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    image_size: int = 224,
    views: tuple[str, ...] = ("image", "aug1", "aug2"),
    workers: int = 0,
    source_workers: int = 0,
    warmup: int = 3,
    steps: int = 10,
) -> dict[str, Any]:
    workers = workers or os.cpu_count() or 1
    dataset = BetonDataset(data)
    cfg = AugmentConfig(image_size=image_size)
    sampler = EpochSampler(len(dataset), batch_size, seed=0)
    ours = ThreeViewLoader(dataset, sampler, views, cfg, device=device, threads=workers, source_workers=source_workers, seed=0)
    slip_rate = _rate(ours, batch_size, warmup, steps)
    del ours
    baseline = pil_loader(dataset, views, cfg, batch_size=batch_size, workers=workers)
    base_rate = _rate(_forever(baseline), batch_size, warmup, steps)
    return {
        "data": str(data),
        "device": device,
        "batch_size": batch_size,
        "image_size": image_size,
        "views": list(views),
        "workers": workers,
        "source_workers": source_workers,
        "slipstream": {"samples_per_s": slip_rate},
        "baseline": {"samples_per_s": base_rate},
        "ratio": slip_rate / base_rate,
    }
