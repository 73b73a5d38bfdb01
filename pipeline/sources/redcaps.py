"""RedCaps: annotation JSON of {image_id, subreddit, caption}; images at `images/<subreddit>/<image_id>.jpg`.

Accepts the SLIP reference's combined file (a top-level list, as its redcaps/combine_captions.py
writes it) and RedCaps' own per-subreddit files ({"info": ..., "annotations": [...]}).
RedCaps has one caption per image (its post's title), so an annotation that repeats an
earlier one's image_id is duplicate_id, counted by the converter, not a second caption.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.sources import Records, Sample, Skip, SourceError, read_json_file

NAME = "redcaps"
HELP = "RedCaps: images/<subreddit>/<image_id>.jpg and the combined annotation JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="directory holding <subreddit>/<image_id>.jpg")
    parser.add_argument(
        "--annotations", required=True, metavar="FILE", help="annotation JSON: a list, or {'annotations': [...]}"
    )


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(images=args.images, annotations=args.annotations)


def _load(path: Path) -> list[Any]:
    data = read_json_file(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return data["annotations"]
    if isinstance(data, list):
        return data
    raise SourceError(f"{path}: expected a list of annotations or an object with an 'annotations' list")


def _usable_name(value: Any) -> bool:
    # Both fields become path components: a separator or ".." would point outside the image root.
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


def iter_samples(*, images: str | Path, annotations: str | Path) -> Records:
    return Records(functools.partial(_read, Path(images), Path(annotations)))


def _read(root: Path, path: Path, records: Records) -> Iterator[Sample | Skip]:
    anns = _load(path)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    records.total = len(anns)
    for i, ann in enumerate(anns):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not (_usable_name(image_id) and _usable_name(ann.get("subreddit")) and isinstance(ann.get("caption"), str)):
            uid = image_id if isinstance(image_id, str) and image_id else f"{path.name}#{i}"
            yield Skip(uid, "malformed_annotation")
            continue
        yield Sample(image_id, str(root / ann["subreddit"] / f"{image_id}.jpg"), [ann["caption"]])
