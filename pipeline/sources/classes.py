"""A labelled image tree (ImageNet layout): `DIR/<class>/<image>`, the label being the class's
index among the sorted sub-folder names.

The converted dataset records the class list in its manifest (`classes`, and with --classnames
the readable names zero-shot prompts need; folder names such as ImageNet's n01440764 are not
recorded as names); a sample's label follows from its id, `<class>/<file stem>`, so the shards
keep schema v1 and stay readable by FFCV's own Loader. The caption of an image is its sidecar
`.txt` when there is one, else its class's name.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.sources import Records, Sample, SourceError
from pipeline.sources.folder import IMAGE_SUFFIXES, read_captions

NAME = "classes"
HELP = "one sub-folder per class (ImageNet layout); a labelled dataset for `slip eval zeroshot|linear`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="directory with one sub-folder of images per class")
    parser.add_argument(
        "--classnames", metavar="FILE", help="readable class names, one per line in sorted folder order (default: the folder names)"
    )


def class_list(images: str | Path) -> list[str]:
    root = Path(images)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise SourceError(f"{root}: no class sub-folders")
    return names


def classnames(images: str | Path, path: str | Path | None) -> list[str]:
    classes = class_list(images)
    if path is None:
        return classes
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(classes):
        raise SourceError(f"{path}: {len(names)} class names for {len(classes)} class folders in {images}")
    return names


def manifest_extra(args: argparse.Namespace) -> dict[str, Any]:
    """Recorded in the manifest (and checked on --resume): what turns sample ids into labels."""
    extra: dict[str, Any] = {"classes": class_list(args.images)}
    if args.classnames:
        extra["classnames"] = classnames(args.images, args.classnames)
    return extra


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(args.images, classnames(args.images, args.classnames))


def iter_samples(images: str | Path, names: list[str] | None = None) -> Records:
    return Records(functools.partial(_read, Path(images), names))


def _read(root: Path, names: list[str] | None, records: Records) -> Iterator[Sample]:
    classes = class_list(root)
    names = names or classes
    # The files directly in each class folder, as DALI's file reader takes them from a folder tree.
    files = [sorted(p for p in (root / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) for c in classes]
    records.total = sum(map(len, files))
    for cls, name, paths in zip(classes, names, files):
        for path in paths:
            uid = f"{cls}/{path.stem}"  # the label is in the id
            yield Sample(uid, str(path), read_captions(path.with_suffix(".txt")) or [name])


def labels_from_ids(ids: list[str], classes: list[str]) -> list[int]:
    """Each sample's class index, from its id `<class>/<stem>`."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for uid in ids:
        label = index.get(uid.split("/", 1)[0])
        if label is None:
            raise SourceError(f"sample id {uid!r} names no class of the manifest")
        out.append(label)
    return out
