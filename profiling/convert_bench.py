"""Conversion speed, side by side: `slip convert` against a plain single-process PIL loop.

The baseline is what a conversion script without slipstream does: for each file, PIL
decode, EXIF transpose, RGB, Lanczos resize to the longest side, JPEG encode; no captions,
no shards. Both run over the same files in one process tree, one after the other.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

import pipeline.ffcv_compat  # noqa: F401  (FFCV's import, seconds, is paid here and not timed)
from pipeline.convert import ConvertOptions, convert
from pipeline.sources import folder
from pipeline.text import tokenize


def _write_images(out_dir: Path, indices: range, seed: int, sides: tuple[int, int]) -> None:
    for i in indices:
        rng = np.random.default_rng([seed, i])  # per image: the same files whatever the number of workers
        h, w = rng.integers(sides[0], sides[1] + 1, 2)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(5, 60)), np.cos(yy / rng.uniform(5, 60)), np.sin((xx + yy) / 40)], -1)
        pixels = (127 + 80 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)  # (h, w, 3)
        Image.fromarray(pixels).save(out_dir / f"{i:06d}.jpg", quality=90)
        (out_dir / f"{i:06d}.txt").write_text(f"a synthetic photo number {i}\n")


def synthetic_images(out_dir: Path, n: int, *, seed: int = 0, sides: tuple[int, int] = (400, 640), workers: int = 1) -> Path:
    """n photo-like JPEGs (quality 90, sides in `sides`) with a caption each, in a folder layout,
    written by `workers` processes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk = max(1, -(-n // max(1, workers)))
    jobs = [range(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    if len(jobs) <= 1:
        for job in jobs:
            _write_images(out_dir, job, seed, sides)
        return out_dir
    with ProcessPoolExecutor(len(jobs)) as pool:
        list(pool.map(_write_images, [out_dir] * len(jobs), jobs, [seed] * len(jobs), [sides] * len(jobs)))
    return out_dir


def baseline_loop(paths: list[Path], max_side: int, quality: int) -> float:
    """Seconds for the plain PIL loop over `paths`."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            if max(image.size) > max_side:
                scale = max_side / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
            image.save(io.BytesIO(), format="JPEG", quality=quality)
    return time.perf_counter() - start


def compare(
    images: Path, workers: list[int], *, max_side: int = 384, quality: int = 90, shard_size: int = 1000
) -> dict[str, Any]:
    """images/s of the baseline and of `slip convert` at each worker count, and the ratios."""
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg")
    n = len(paths)
    results: dict[str, Any] = {"images": n, "cores": os.cpu_count(), "max_side": max_side, "quality": quality,
                               "shard_size": shard_size}  # fmt: skip
    results["baseline"] = {"images_per_s": n / baseline_loop(paths, max_side, quality)}
    tokenize(["warm up"])  # the BPE vocabulary is loaded once per process, not per image: not timed
    for w in workers:
        out = Path(tempfile.mkdtemp(prefix="slip-bench-")) / "out"
        try:
            # Several shards, as in a real conversion, so writing one overlaps preparing the next.
            options = ConvertOptions(max_side=max_side, quality=quality, captions_per_image=1, workers=w, shard_size=shard_size)
            start = time.perf_counter()
            convert(folder.iter_samples(images), out, source="folder", options=options, progress=False)
            rate = n / (time.perf_counter() - start)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        results[f"slipstream_workers_{w}"] = {"images_per_s": rate, "ratio": rate / results["baseline"]["images_per_s"]}
    return results
