"""Evaluation images: a class-per-folder tree (ImageNet layout) through DALI, resized and center-cropped.

Labels are the indices of the sorted sub-folder names. Every image is read exactly once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import AugmentConfig, normalize


def class_folders(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise FileNotFoundError(f"{root}: no class sub-folders")
    return names


def iter_folder(
    root: str | Path,
    augment: AugmentConfig,
    *,
    batch_size: int,
    threads: int = 2,
    device: str = "cpu",
    device_id: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 [b, 3, S, S], labels int64 [b]) over the whole folder, the last batch short."""
    class_folders(root)
    size = augment.image_size

    @pipeline_def
    def graph():
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=False, pad_last_batch=True, name="reader")
        images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        # As SLIP's evaluation: resize the shorter side, then a center crop of the training size.
        images = fn.resize(images, resize_shorter=size, antialias=True)
        return normalize(images, augment, crop=(size, size)), labels

    pipe = graph(batch_size=batch_size, num_threads=threads, device_id=device_id if device == "gpu" else None, seed=0)
    pipe.build()
    remaining = pipe.epoch_size("reader")
    while remaining > 0:
        images, labels = pipe.run()
        keep = min(remaining, batch_size)
        x = torch.from_dlpack(images.as_tensor())[:keep].clone()  # (b, 3, S, S)
        y = torch.from_numpy(np.asarray(labels.as_cpu().as_tensor()).reshape(-1)[:keep].astype(np.int64))  # (b,)
        remaining -= keep
        yield x, y
