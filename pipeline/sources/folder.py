"""An image folder with sidecar captions: `a/b.jpg` + `a/b.txt` (one caption per line)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pipeline.sources import Sample, SourceError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_captions(path: Path) -> list[str]:
    """Lines of a sidecar file; undecodable bytes are replaced so one bad byte keeps the caption."""
    if not path.is_file():
        return []
    return path.read_bytes().decode("utf-8", errors="replace").splitlines()


def iter_samples(images: str | Path) -> Iterator[Sample]:
    root = Path(images)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        uid = path.relative_to(root).with_suffix("").as_posix()
        yield Sample(uid, str(path), read_captions(path.with_suffix(".txt")))
