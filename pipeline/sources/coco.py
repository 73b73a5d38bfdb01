"""COCO captions: `captions_train2017.json` (`images` [{id, file_name}], `annotations` [{image_id, caption}]).

An image's annotations are its captions, in file order. An `images` entry that repeats an
earlier entry's id is duplicate_id (the first is kept, and holds every caption of that id);
one without an int id or a file name, and an annotation naming no listed image, are
malformed_annotation.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.sources import Records, Sample, Skip, SourceError, read_json_file, sample_under

NAME = "coco"
HELP = "COCO captions: an image directory and captions_*.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="directory of the images, e.g. coco/train2017")
    parser.add_argument(
        "--annotations", required=True, metavar="FILE", help="captions JSON, e.g. annotations/captions_train2017.json"
    )


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(images=args.images, annotations=args.annotations)


def _load(path: Path) -> tuple[list[Any], list[Any]]:
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise SourceError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    return data["images"], data["annotations"]


def iter_samples(*, images: str | Path, annotations: str | Path) -> Records:
    """One sample per entry of `images`, in file order, with all its captions in annotation order;
    first the Skips of the annotations that name no listed image."""
    return Records(functools.partial(_read, Path(images), Path(annotations)))


def _read(root: Path, ann_path: Path, records: Records) -> Iterator[Sample | Skip]:
    entries, anns = _load(ann_path)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")

    # Validate the image list first: a caption can only belong to an image that is listed.
    known: dict[int, str] = {}
    bad_images: dict[int, str] = {}  # position of a malformed or repeated entry -> its skip reason
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and type(entry.get("id")) is int and isinstance(entry.get("file_name"), str)
        if not ok or not entry["file_name"]:
            bad_images[i] = "malformed_annotation"
        elif entry["id"] in known:
            bad_images[i] = "duplicate_id"
        else:
            known[entry["id"]] = entry["file_name"]

    captions: dict[int, list[str]] = {image_id: [] for image_id in known}
    orphans: list[Skip] = []
    for j, ann in enumerate(anns):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if type(image_id) is not int or image_id not in captions or not isinstance(ann.get("caption"), str):
            # COCO annotations carry their own id; fall back to the position when even that is absent.
            ann_id = ann.get("id", j) if isinstance(ann, dict) else j
            orphans.append(Skip(f"annotation {ann_id}", "malformed_annotation"))
            continue
        captions[image_id].append(ann["caption"])
    records.total = len(orphans) + len(entries)
    yield from orphans

    for i, entry in enumerate(entries):
        if i in bad_images:
            uid = entry.get("id", f"#{i}") if isinstance(entry, dict) else f"#{i}"
            yield Skip(str(uid), bad_images[i])
            continue
        # An image without captions is still yielded: the converter counts it as no_caption.
        uid = str(entry["id"])
        yield sample_under(root, entry["file_name"], uid, captions[entry["id"]])
