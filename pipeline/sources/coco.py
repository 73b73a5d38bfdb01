"""COCO captions: `captions_train2017.json` (`images` [{id, file_name}], `annotations` [{image_id, caption}])."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.sources import Sample, Skip, SourceError, read_json_file, sample_under

NAME = "coco"
HELP = "COCO captions: an image directory and captions_*.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="directory of the images, e.g. coco/train2017")
    parser.add_argument(
        "--annotations", required=True, metavar="FILE", help="captions JSON, e.g. annotations/captions_train2017.json"
    )


def from_args(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    return iter_samples(images=args.images, annotations=args.annotations)


def _load(path: Path) -> tuple[list[Any], list[Any]]:
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise SourceError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    return data["images"], data["annotations"]


def iter_samples(*, images: str | Path, annotations: str | Path) -> Iterator[Sample | Skip]:
    """One sample per entry of `images`, in file order, with all its captions in annotation order."""
    root, ann_path = Path(images), Path(annotations)
    entries, anns = _load(ann_path)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")

    # Validate the image list first: a caption can only belong to an image that is listed.
    known: dict[int, str] = {}
    bad_images: set[int] = set()  # positions of malformed or duplicate entries
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and type(entry.get("id")) is int and isinstance(entry.get("file_name"), str)
        if not ok or entry["id"] in known or not entry["file_name"]:
            bad_images.add(i)
        else:
            known[entry["id"]] = entry["file_name"]

    captions: dict[int, list[str]] = {image_id: [] for image_id in known}
    for j, ann in enumerate(anns):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if type(image_id) is not int or image_id not in captions or not isinstance(ann.get("caption"), str):
            # COCO annotations carry their own id; fall back to the position when even that is absent.
            ann_id = ann.get("id", j) if isinstance(ann, dict) else j
            yield Skip(f"annotation {ann_id}", "malformed_annotation")
            continue
        captions[image_id].append(ann["caption"])

    for i, entry in enumerate(entries):
        if i in bad_images:
            uid = entry.get("id", f"#{i}") if isinstance(entry, dict) else f"#{i}"
            yield Skip(str(uid), "malformed_annotation")
            continue
        # An image without captions is still yielded: the converter counts it as no_caption.
        uid = str(entry["id"])
        yield sample_under(root, entry["file_name"], uid, captions[entry["id"]])
