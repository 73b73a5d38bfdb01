"""Any CSV/TSV table with a header: one row per image, an image-path column and a caption column."""
from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.sources import Sample, Skip, SourceError, csv_rows, sample_under

NAME = "csv"
HELP = "a CSV/TSV table with a header: image path column (relative to --root) and caption column"

SUFFIX_DELIMITERS = {".csv": ",", ".tsv": "\t"}
NAMED_DELIMITERS = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}  # shell-friendly


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, metavar="FILE", help="the CSV/TSV; its first line names the columns")
    parser.add_argument("--root", required=True, metavar="DIR", help="directory the image paths are relative to")
    parser.add_argument("--image-column", required=True, metavar="C", help="column holding the image path")
    parser.add_argument("--caption-column", required=True, metavar="C", help="column holding the caption")
    parser.add_argument(
        "--delimiter",
        default=None,
        metavar="D",
        help="field separator (default: tab for .tsv, comma for .csv); '\\t' or 'tab' mean a tab",
    )


def from_args(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    return iter_samples(
        table=args.table,
        root=args.root,
        image_column=args.image_column,
        caption_column=args.caption_column,
        delimiter=args.delimiter,
    )


def _delimiter(path: Path, delimiter: str | None) -> str:
    if delimiter is None:
        if path.suffix.lower() not in SUFFIX_DELIMITERS:
            raise SourceError(f"{path}: cannot tell the delimiter from the suffix {path.suffix!r}; pass --delimiter")
        return SUFFIX_DELIMITERS[path.suffix.lower()]
    delimiter = NAMED_DELIMITERS.get(delimiter.lower(), delimiter)
    if len(delimiter) != 1:
        raise SourceError(f"{path}: --delimiter must be one character, got {delimiter!r}")
    return delimiter


def iter_samples(
    *, table: str | Path, root: str | Path, image_column: str, caption_column: str, delimiter: str | None = None
) -> Iterator[Sample | Skip]:
    path, root = Path(table), Path(root)
    if not path.is_file():
        raise SourceError(f"{path}: no such table")
    sep = _delimiter(path, delimiter)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    # Tab-separated files conventionally have no quoting (CC's TSVs hold bare `"` in captions);
    # comma-separated ones need it, since captions contain commas.
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        header = next(reader, [])
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            raise SourceError(f"{path}: no column {missing[0]!r}; the header is {header}")
        i_image, i_caption = header.index(image_column), header.index(caption_column)
        for row in csv_rows(path, reader):
            if not row:
                continue  # a blank line is not a record
            image = row[i_image] if len(row) == len(header) else ""
            caption = row[i_caption] if len(row) == len(header) else ""
            if not image.strip() or not caption.strip():
                # Too few or too many fields means the columns cannot be trusted, not just one value.
                yield Skip(image.strip() or f"{path.name}:{reader.line_num}", "malformed_annotation")
                continue
            yield sample_under(root, image, image, [caption])
