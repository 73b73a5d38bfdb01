"""Conceptual Captions (CC3M / CC12M) in the SLIP reference's layouts.

Either a `.npy` array of dicts, `{"image_id": 1510438788, "captions": [...]}` (CC3M) or
`{"image_name": "0.jpg", "image_id": 0, "captions": [...]}` (CC12M), or a `.tsv` of
`caption<TAB>path` lines, one caption per line, paths relative to the image root: lines naming
the same path are one image's captions (pipeline/sources/rows.py). An entry of the .npy that
repeats an earlier one's id is duplicate_id, counted by the converter.
"""
from __future__ import annotations

import argparse
import functools
import numbers
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.sources import Records, Sample, Skip, SourceError, join_under, sample_under
from pipeline.sources.rows import Row, grouped

NAME = "cc"
HELP = "Conceptual Captions CC3M/CC12M: an image root and a .npy of dicts or a caption<TAB>path .tsv"

TSV_HEADERS = (("caption", "path"), ("caption", "filepath"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, metavar="DIR", help="directory the image paths are relative to")
    parser.add_argument(
        "--annotations",
        required=True,
        metavar="FILE",
        help="cc3m.npy / cc12m.npy (array of dicts), or a caption<TAB>path .tsv",
    )


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(root=args.root, annotations=args.annotations)


def _npy_entry(root: Path, entry: Any) -> tuple[str, str, list[str]] | None:
    """(uid, path, captions) of one dict, or None when it lacks the fields or has the wrong types."""
    if not isinstance(entry, dict) or not isinstance(entry.get("captions"), (list, tuple)):
        return None
    if not all(isinstance(c, str) for c in entry["captions"]):
        return None
    image_id, image_name = entry.get("image_id"), entry.get("image_name")
    # `image_id` 0 is a real id (CC12M starts there): test for presence, never truthiness.
    has_id = isinstance(image_id, (str, numbers.Integral)) and not isinstance(image_id, bool) and str(image_id) != ""
    if isinstance(image_name, str) and image_name:
        # CC12M names the file explicitly; the reference reads `image_name`, so it wins over the id.
        path = join_under(root, image_name)
        return None if path is None else ((str(image_id) if has_id else image_name), path, list(entry["captions"]))
    if has_id:
        name = str(image_id)
        # CC3M: the id is the file's stem; an id that already carries a suffix is taken as the name.
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            name += ".jpg"
        path = join_under(root, name)
        return None if path is None else (str(image_id), path, list(entry["captions"]))
    return None


def _iter_npy(root: Path, path: Path, records: Records) -> Iterator[Sample | Skip]:
    try:
        # allow_pickle only because this is the reference's own annotation format, produced by
        # the user's download scripts; it runs arbitrary code, so never point it at untrusted files.
        entries = np.load(path, allow_pickle=True)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise SourceError(f"{path}: not a readable .npy ({type(err).__name__})") from None
    if not isinstance(entries, np.ndarray) or entries.ndim != 1:
        raise SourceError(f"{path}: expected a 1-d array of dicts, got {type(entries).__name__}")
    records.total = len(entries)
    for i, entry in enumerate(entries):
        parsed = _npy_entry(root, entry)
        if parsed is None:
            yield Skip(f"{path.name}#{i}", "malformed_annotation")
        else:
            yield Sample(*parsed)


def _tsv_rows(path: Path) -> Iterator[Row | Skip]:
    # newline="\n": a stray "\r" inside a caption must not split the line in two.
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if lineno == 1 and tuple(x.strip().lower() for x in fields) in TSV_HEADERS:
                continue
            if fields == [""]:
                continue  # a blank line is not a record
            if len(fields) != 2 or not fields[1]:
                yield Skip(f"{path.name}:{lineno}", "malformed_annotation")
                continue
            caption, rel = fields
            yield Row(rel, caption)


def iter_samples(*, root: str | Path, annotations: str | Path) -> Records:
    return Records(functools.partial(_read, Path(root), Path(annotations)))


def _read(root: Path, path: Path, records: Records) -> Iterator[Sample | Skip]:
    if not path.is_file():
        raise SourceError(f"{path}: no such annotation file")
    if path.suffix.lower() not in (".npy", ".tsv"):
        raise SourceError(f"{path}: expected a .npy or .tsv annotation file")
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    if path.suffix.lower() == ".npy":
        yield from _iter_npy(root, path, records)
    else:
        rows = functools.partial(_tsv_rows, path)
        yield from grouped(rows, lambda rel, captions: sample_under(root, rel, rel, captions), records, str(path))
