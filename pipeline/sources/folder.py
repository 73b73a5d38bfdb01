"""An image folder with sidecar captions: `a/b.jpg` + `a/b.txt` (one caption per line)."""
from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path

from pipeline.sources import Records, Sample, SourceError

NAME = "folder"
HELP = "images with a sidecar .txt of captions, one per line"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="directory of images (searched recursively)")


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(args.images)


def read_captions(path: Path) -> list[str]:
    """Lines of a sidecar file; undecodable bytes are replaced so one bad byte keeps the caption."""
    if not path.is_file():
        return []
    return path.read_bytes().decode("utf-8", errors="replace").splitlines()


def iter_samples(images: str | Path) -> Records:
    return Records(functools.partial(_read, Path(images)))


def _read(root: Path, records: Records) -> Iterator[Sample]:
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    records.total = len(paths)
    for path in paths:
        uid = path.relative_to(root).with_suffix("").as_posix()
        yield Sample(uid, str(path), read_captions(path.with_suffix(".txt")))
