"""The evaluation view: images through DALI, resized (shorter side) and center-cropped as SLIP evaluates.

Two sources: a class-per-folder tree (ImageNet layout; labels are the indices of the sorted
sub-folder names) and a converted `.beton` directory (in sample order; labelled when it was
written by `slip convert classes`). Every image is read exactly once, and checked before DALI
sees it (`image_check.py` for a file, the loader's structural check for a stored JPEG): one that
fails is left out and counted by reason (`Skipped`), never replaced, so every label stays true
and DALI's decoder, which can crash the process on some bad input, never meets it.

DALI is imported when a graph is built, not with this module: the config tree and the trainer
import it, and a node without DALI (the offline bundle's first tier) still trains and profiles.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment_config import AugmentConfig
from pipeline.handoff import Handoff
from pipeline.image_check import UNDECODABLE, read_image
from pipeline.jpeg_check import OK, REASONS, check_jpeg
from pipeline.reader import BetonDataset
from pipeline.schema import MANIFEST
from pipeline.sources.classes import class_list as class_folders  # one definition of a class tree's classes

# The image files of a class folder (DALI's image decoder reads these formats).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2", ".webp"})
SHOWN = 5  # skipped samples named in a report


@dataclass
class Skipped:
    """Samples an evaluation left out because they cannot be decoded: counted by reason, the first
    few named. A skipped sample is dropped, never replaced by another, so every label stays true."""

    by_reason: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)  # "<file or sample>: <reason>"

    def add(self, name: str, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.first) < SHOWN:
            self.first.append(f"{name}: {reason}")

    def extend(self, other: Skipped) -> None:
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        self.first += other.first[: max(0, SHOWN - len(self.first))]

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def report(self) -> dict:
        """What a result records: "skipped", {reason: count}, and "skipped_first", the first few named."""
        return {"skipped": dict(sorted(self.by_reason.items())), "skipped_first": list(self.first)}


def folder_files(root: str | Path) -> list[tuple[Path, int]]:
    """(file, label) for every image file of a class-per-folder tree: the files directly in each
    class folder, by name, classes in sorted order (as `slip convert classes` reads them)."""
    out = []
    for label, name in enumerate(class_folders(root)):
        try:
            files = sorted(f for f in (Path(root) / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as err:  # a class folder that cannot be listed would silently lose a class
            raise NotADirectoryError(f"{Path(root) / name}: cannot list the class folder ({err.strerror or err})") from None
        out += [(f, label) for f in files]
    return out


def count_images(root: str | Path) -> int:
    """Images in a class-per-folder tree, as the reader will see them (for progress bars)."""
    return len(folder_files(root))


# (name for a report, the key returned with the image, a reader giving (bytes, None) or (None, reason)).
Sample = tuple[str, int, Callable[[], tuple[np.ndarray | None, str | None]]]


def iter_folder(
    root: str | Path,
    augment: AugmentConfig,
    *,
    batch_size: int,
    threads: int = 2,
    device: str = "cpu",
    device_id: int = 0,
    skipped: Skipped | None = None,
    resize: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 [b, 3, S, S], labels int64 [b]) over every decodable image of the folder, the
    last batch short; `resize` as in `eval_graph`. A file that cannot be read or fails `check_image` is left out and counted in
    `skipped`; its bytes never reach DALI."""
    samples = ((str(f), label, functools.partial(read_image, f)) for f, label in folder_files(root))
    graph = functools.partial(eval_graph, fed_reader, augment, batch_size, threads, device, device_id, fed=True, resize=resize)
    skipped = skipped if skipped is not None else Skipped()
    yield from decode_batches(_checked(samples, batch_size, skipped), graph, device, device_id, skipped)


def iter_beton(
    dataset: BetonDataset,
    augment: AugmentConfig,
    *,
    batch_size: int,
    threads: int = 2,
    device: str = "cpu",
    device_id: int = 0,
    skipped: Skipped | None = None,
    resize: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 [b, 3, S, S], sample indices int64 [b]) over every decodable sample in order,
    the last batch short; `resize` as in `eval_graph`. A sample whose stored JPEG fails the loader's structural check is left
    out and counted in `skipped`."""
    if len(dataset) == 0:
        raise ValueError(f"{dataset.directory}: no samples")

    samples = (beton_sample(dataset, i, i) for i in range(len(dataset)))
    graph = functools.partial(eval_graph, fed_reader, augment, batch_size, threads, device, device_id, fed=True, resize=resize)
    skipped = skipped if skipped is not None else Skipped()
    yield from decode_batches(_checked(samples, batch_size, skipped), graph, device, device_id, skipped)


def _read_stored(dataset: BetonDataset, i: int) -> tuple[np.ndarray | None, str | None]:
    data = dataset.jpeg(i)
    verdict = check_jpeg(data, *dataset.image_size(i))
    return (data, None) if verdict == OK else (None, REASONS[verdict])


def beton_sample(dataset: BetonDataset, i: int, key: int) -> Sample:
    """Sample i of a converted dataset, read and checked when asked for, returned with `key`."""
    return f"{dataset.shard_path(i)} sample {i}", key, functools.partial(_read_stored, dataset, i)


def folder_sample(path: Path, key: int) -> Sample:
    """An image file, read and checked when asked for, returned with `key`."""
    return str(path), key, functools.partial(read_image, path)


def fed_reader(fn: Any) -> tuple:
    """The inputs of a fed evaluation graph: "encoded" images and their "key"s (`decode_batches`)."""
    return fn.external_source(name="encoded"), fn.external_source(name="key")


def eval_graph(reader: Callable, augment: AugmentConfig, batch_size: int, threads: int, device: str, device_id: int | None,
               *, fed: bool = False, resize: int | None = None) -> Any:  # fmt: skip
    """The evaluation view's DALI pipeline, defined but not built: `reader(fn)` gives (encoded
    images, a second output); the images are decoded, their shorter side resized (to the training
    size, as SLIP's zero-shot evaluates, or to `resize`: 256 for 224 in the SGD linear protocol),
    then center-cropped to the training size. A GPU graph defined with device_id=None can
    be serialised (its operators checked against DALI's schemas) without CUDA. `fed`: the inputs
    come from `feed_input` one batch at a time (no prefetching), so a failed batch is known."""
    from nvidia.dali import fn, pipeline_def

    from pipeline.augment import decode, normalize

    size = augment.image_size

    @pipeline_def
    def graph():
        jpegs, second = reader(fn)
        images = fn.resize(decode(jpegs, device), resize_shorter=resize or size, antialias=True)
        return normalize(images, augment, crop=(size, size)), second

    serial = {"prefetch_queue_depth": 1, "exec_async": False, "exec_pipelined": False} if fed else {}
    return graph(batch_size=batch_size, num_threads=threads, device_id=device_id if device == "gpu" else None, seed=0, **serial)


def checked(batch: Iterable[Sample], skipped: Skipped) -> list[tuple[str, int, np.ndarray]]:
    """(name, key, bytes) of the samples that pass the checks; the others are counted in `skipped`."""
    out = []
    for name, key, read in batch:
        data, reason = read()
        if reason is None:
            out.append((name, key, data))
        else:
            skipped.add(name, reason)
    return out


def _checked(samples: Iterable[Sample], batch_size: int, skipped: Skipped) -> Iterator[list[tuple[str, int, np.ndarray]]]:
    """Full batches of (name, key, bytes) that passed the checks, the last one short."""
    batch = []
    for sample in samples:
        batch += checked([sample], skipped)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def decode_batches(batches: Iterable[list[tuple[str, int, np.ndarray]]], graph: Callable[[], Any], device: str, device_id: int,
                   skipped: Skipped, feeds: Callable[[list[int]], dict[str, np.ndarray]] | None = None,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(views [b, 3, S, S], keys int64 [b]), one per batch of checked (name, key, bytes): `graph()`
    defines a fed pipeline whose inputs are "encoded" and "key", plus `feeds(keys)`'s. Bytes that
    pass the checks and still fail DALI's decoder are found by decoding the batch's images one at
    a time (as the training loader does), skipped as `undecodable`, and the batch is run again
    without them; a batch left with none yields empty tensors. The views are copies: DALI's
    buffers are released once the copy has run (`Handoff`)."""
    handoff = Handoff(torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu"))
    pipe = None
    try:
        for batch in batches:
            if not batch:
                yield torch.empty(0), torch.empty(0, dtype=torch.int64)
            while batch:
                if pipe is None:
                    pipe = graph()
                    pipe.build()
                pipe.feed_input("encoded", [data for _, _, data in batch])
                pipe.feed_input("key", np.asarray([[key] for _, key, _ in batch], dtype=np.int64))
                for name, values in (feeds([key for _, key, _ in batch]) if feeds else {}).items():
                    pipe.feed_input(name, values)
                try:
                    outputs = handoff.run(pipe)
                except RuntimeError:
                    from pipeline.loader import dali_decodes

                    verdicts = dali_decodes([data for _, _, data in batch], device, device_id)
                    if all(verdicts):
                        raise
                    for (name, _, _), ok in zip(batch, verdicts):
                        if not ok:
                            skipped.add(name, UNDECODABLE)
                    batch = [item for item, ok in zip(batch, verdicts) if ok]
                    handoff.close()
                    pipe = None  # a failed pipeline is not run again
                    if not batch:
                        yield torch.empty(0), torch.empty(0, dtype=torch.int64)
                    continue
                images, keys = outputs
                x = torch.from_dlpack(images.as_tensor()).clone()  # (b, 3, S, S)
                handoff.retire(outputs)
                yield x, torch.from_numpy(np.asarray(keys.as_cpu().as_tensor()).reshape(-1).astype(np.int64))  # (b,)
                batch = []
    finally:
        handoff.close()


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

    def batches(self, augment: AugmentConfig, *, batch_size: int, threads: int = 2, device: str = "cpu", device_id: int = 0,
                skipped: Skipped | None = None, resize: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(images float32 [b, 3, S, S], labels int64 [b]), every decodable image once, the last batch
        short; the others are counted in `skipped`; `resize` as in `eval_graph`."""
        kw = {"batch_size": batch_size, "threads": threads, "device": device, "device_id": device_id, "skipped": skipped, "resize": resize}
        if self.dataset is None:
            yield from iter_folder(self.path, augment, **kw)
            return
        labels = torch.from_numpy(self.dataset.labels())  # (n,)
        for images, index in iter_beton(self.dataset, augment, **kw):
            yield images, labels[index]

    def samples(self) -> tuple[list[Sample], torch.Tensor]:
        """Every image as a Sample keyed by its position, and the labels int64 [n] by position."""
        if self.dataset is None:
            files = folder_files(self.path)
            return [folder_sample(f, i) for i, (f, _) in enumerate(files)], torch.tensor([label for _, label in files], dtype=torch.int64)
        return [beton_sample(self.dataset, i, i) for i in range(len(self.dataset))], torch.from_numpy(self.dataset.labels()).long()


def labelled_images(path: str | Path) -> LabelledImages:
    """A class-per-folder tree or a labelled converted dataset; the error names what is missing."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        dataset = BetonDataset(path)
        if dataset.classes is None:
            dataset.labels()  # raises: the dataset has no labels, and says how to make one
        return LabelledImages(path, list(dataset.classes), dataset.manifest.get("classnames"), len(dataset), dataset)
    return LabelledImages(path, class_folders(path), None, count_images(path))
