"""The evaluation view: images through DALI, resized (shorter side) and center-cropped as SLIP evaluates.

Two sources: a class-per-folder tree (ImageNet layout; labels are the indices of the sorted
sub-folder names) and a converted `.beton` directory (in sample order; labelled when it was
written by `slip convert classes`). Every image is read exactly once.

DALI is imported when a graph is built, not with this module: the config tree and the trainer
import it, and a node without DALI (the offline bundle's first tier) still trains and profiles.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment_config import AugmentConfig
from pipeline.handoff import Handoff
from pipeline.reader import BetonDataset
from pipeline.schema import MANIFEST
from pipeline.sources.classes import class_list as class_folders  # one definition of a class tree's classes

# What DALI's file reader picks up in a class folder (its default extensions).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2", ".webp"})


def count_images(root: str | Path) -> int:
    """Images in a class-per-folder tree, as the reader will see them (for progress bars)."""
    return sum(
        1 for name in class_folders(root) for f in (Path(root) / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
    )


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
    pipe = _built(lambda fn: fn.readers.file(file_root=str(root), random_shuffle=False, pad_last_batch=True, name="reader"),
                  augment, batch_size, threads, device, device_id)  # fmt: skip
    yield from _batches(pipe, pipe.epoch_size("reader"), batch_size, device, device_id)


def eval_graph(reader: Callable, augment: AugmentConfig, batch_size: int, threads: int, device: str, device_id: int | None) -> Any:
    """The evaluation view's DALI pipeline, defined but not built: `reader(fn)` gives (encoded
    images, a second output); the images are decoded, their shorter side resized, then center-
    cropped to the training size, as SLIP evaluates. A GPU graph defined with device_id=None can
    be serialised (its operators checked against DALI's schemas) without CUDA."""
    from nvidia.dali import fn, pipeline_def

    from pipeline.augment import decode, normalize

    size = augment.image_size

    @pipeline_def
    def graph():
        jpegs, second = reader(fn)
        images = fn.resize(decode(jpegs, device), resize_shorter=size, antialias=True)
        return normalize(images, augment, crop=(size, size)), second

    return graph(batch_size=batch_size, num_threads=threads, device_id=device_id if device == "gpu" else None, seed=0)


def _built(reader: Callable, augment: AugmentConfig, batch_size: int, threads: int, device: str, device_id: int) -> Any:
    pipe = eval_graph(reader, augment, batch_size, threads, device, device_id)
    pipe.build()
    return pipe


def _batches(pipe, n: int, batch_size: int, device: str, device_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The pipeline's (views, int64 second output) for n samples; the last, padded batch is cut to n.
    The views are copies: DALI's buffers are released only once the copy has run (`Handoff`)."""
    handoff = Handoff(torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu"))
    try:
        for start in range(0, n, batch_size):
            outputs = handoff.run(pipe)
            images, second = outputs
            keep = min(n - start, batch_size)
            x = torch.from_dlpack(images.as_tensor())[:keep].clone()  # (b, 3, S, S)
            handoff.retire(outputs)
            y = torch.from_numpy(np.asarray(second.as_cpu().as_tensor()).reshape(-1)[:keep].astype(np.int64))  # (b,)
            yield x, y
    finally:
        handoff.close()


def iter_beton(
    dataset: BetonDataset,
    augment: AugmentConfig,
    *,
    batch_size: int,
    threads: int = 2,
    device: str = "cpu",
    device_id: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 [b, 3, S, S], sample indices int64 [b]) over every sample in order, the last batch short."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{dataset.directory}: no samples")

    def source(info):  # DALI asks for whole batches by iteration; the tail wraps and is cut below
        start = info.iteration * batch_size
        indices = [(start + k) % n for k in range(batch_size)]
        return [dataset.jpeg(i) for i in indices], np.asarray(indices, dtype=np.int64).reshape(-1, 1)

    pipe = _built(lambda fn: fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True),
                  augment, batch_size, threads, device, device_id)  # fmt: skip
    yield from _batches(pipe, n, batch_size, device, device_id)


@dataclass
class LabelledImages:
    """A labelled evaluation set, whichever form it is stored in."""

    path: Path
    classes: list[str]  # folder names, in label order
    classnames: list[str] | None  # readable names recorded at conversion, if any
    n_images: int
    dataset: BetonDataset | None = None  # the converted dataset, opened once; None for a folder tree

    @property
    def is_beton(self) -> bool:
        return self.dataset is not None

    def batches(self, augment: AugmentConfig, *, batch_size: int, threads: int = 2, device: str = "cpu", device_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images float32 [b, 3, S, S], labels int64 [b]), every image once, the last batch short."""
        kw = {"batch_size": batch_size, "threads": threads, "device": device, "device_id": device_id}
        if self.dataset is None:
            yield from iter_folder(self.path, augment, **kw)
            return
        labels = torch.from_numpy(self.dataset.labels())  # (n,)
        for images, index in iter_beton(self.dataset, augment, **kw):
            yield images, labels[index]


def labelled_images(path: str | Path) -> LabelledImages:
    """A class-per-folder tree or a labelled converted dataset; the error names what is missing."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        dataset = BetonDataset(path)
        if dataset.classes is None:
            dataset.labels()  # raises: the dataset has no labels, and says how to make one
        return LabelledImages(path, list(dataset.classes), dataset.manifest.get("classnames"), len(dataset), dataset)
    return LabelledImages(path, class_folders(path), None, count_images(path))
