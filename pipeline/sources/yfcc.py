"""YFCC15M in the SLIP reference's zip layout: image 12345678 is `678.jpg` in `images/12/345.zip`.

The layout and the index arithmetic follow the reference's `yfcc_loader` (facebookresearch/SLIP
datasets.py and its README, section 1.1): the index is zero-padded to 8 digits, split 2 / 3 / rest.
Metadata is the reference's `yfcc15m.pkl` (a list of (index, title, description) tuples, as its
make_dataset.py writes it) or a CSV with the header `index,title,description`. One record per
photo: a repeated index is duplicate_id, counted by the converter.
"""
from __future__ import annotations

import argparse
import csv
import functools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.sources import Records, Sample, Skip, SourceError, csv_rows

NAME = "yfcc"
HELP = "YFCC15M: root/images/NN/NNN.zip archives and the yfcc15m.pkl (or index,title,description CSV) metadata"

CSV_COLUMNS = ("index", "title", "description")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, metavar="DIR", help="directory holding images/NN/NNN.zip")
    parser.add_argument(
        "--metadata", required=True, metavar="FILE", help="yfcc15m.pkl, or a CSV with header index,title,description"
    )


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(root=args.root, metadata=args.metadata)


def image_ref(root: Path, index: int) -> tuple[str, str]:
    """(zip archive, member) of one image, exactly as the reference's `yfcc_loader` finds it."""
    digits = f"{index:08d}"
    return str(root / "images" / digits[:2] / f"{digits[2:5]}.zip"), f"{digits[5:]}.jpg"


def _record(root: Path, index: Any, title: Any, description: Any) -> Sample | None:
    if isinstance(index, str) and index.strip().isdigit():
        index = int(index)
    if type(index) is not int or index < 0 or not isinstance(title, str) or not isinstance(description, str):
        return None
    # Title and description are two captions of the same photo; either may be empty.
    captions = [c for c in (title, description) if c.strip()]
    return Sample(f"{index:08d}", image_ref(root, index), captions)


def _iter_pickle(root: Path, path: Path, records: Records) -> Iterator[Sample | Skip]:
    try:
        # pickle only because this is the reference's own metadata format, written by its
        # make_dataset.py on the user's machine; unpickling runs code, so never load untrusted files.
        with open(path, "rb") as f:
            rows = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError) as err:
        raise SourceError(f"{path}: not a readable pickle ({type(err).__name__})") from None
    if not isinstance(rows, (list, tuple)):
        raise SourceError(f"{path}: expected a list of (index, title, description), got {type(rows).__name__}")
    records.total = len(rows)
    for i, record in enumerate(rows):
        sample = _record(root, *record) if isinstance(record, (list, tuple)) and len(record) == 3 else None
        yield sample if sample is not None else Skip(f"{path.name}#{i}", "malformed_annotation")


def _estimated_rows(path: Path) -> int:
    """Rows below the header, from the first MiB's line length: reading 15 million rows twice
    to draw a progress bar would cost more than the bar is worth."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    lines = head.count(b"\n") + (not head.endswith(b"\n") and len(head) == size)
    return max(0, round(lines * size / max(1, len(head))) - 1)


def _iter_csv(root: Path, path: Path, records: Records) -> Iterator[Sample | Skip]:
    records.total = _estimated_rows(path)
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if tuple(header) != CSV_COLUMNS:
            raise SourceError(f"{path}: header is {header}, expected {list(CSV_COLUMNS)}")
        for row in csv_rows(path, reader):
            if not row:
                continue  # a blank line is not a record
            sample = _record(root, *row) if len(row) == 3 else None
            # line_num is the physical line the row ended on: what a user looks at in an editor.
            yield sample if sample is not None else Skip(f"{path.name}:{reader.line_num}", "malformed_annotation")


def iter_samples(*, root: str | Path, metadata: str | Path) -> Records:
    return Records(functools.partial(_read, Path(root), Path(metadata)))


def _read(root: Path, path: Path, records: Records) -> Iterator[Sample | Skip]:
    if not path.is_file():
        raise SourceError(f"{path}: no such metadata file")
    if not (root / "images").is_dir():
        raise SourceError(f"{root / 'images'}: no such image directory")
    if path.suffix.lower() == ".csv":
        yield from _iter_csv(root, path, records)
    elif path.suffix.lower() in (".pkl", ".pickle"):
        yield from _iter_pickle(root, path, records)
    else:
        raise SourceError(f"{path}: expected a .pkl or .csv metadata file")
