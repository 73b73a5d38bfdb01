"""Any CSV/TSV table with a header, an image-path column and a caption column.

One row per caption (Flickr30k's layout) or per image: rows naming the same image, adjacent or
not, are one sample with all their captions (pipeline/sources/rows.py). A row with the wrong
number of fields or no image is malformed_annotation; an empty caption cell is an empty
caption (an image left with none is no_caption), as in every other source.
"""
from __future__ import annotations

import argparse
import csv
import functools
from collections.abc import Iterator
from pathlib import Path

from pipeline.sources import Records, Sample, Skip, SourceError, csv_rows, sample_under
from pipeline.sources.rows import Row, grouped

NAME = "csv"
HELP = "a CSV/TSV table with a header: image path column (relative to --root) and caption column; one row per image or per caption"

SUFFIX_DELIMITERS = {".csv": ",", ".tsv": "\t"}
NAMED_DELIMITERS = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}  # shell-friendly


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, metavar="FILE", help="the CSV/TSV; its first line names the columns")
    parser.add_argument("--root", required=True, metavar="DIR", help="directory the image paths are relative to")
    parser.add_argument("--image-column", required=True, metavar="C", help="column holding the image path; rows naming the same image are its captions")
    parser.add_argument("--caption-column", required=True, metavar="C", help="column holding the caption")
    parser.add_argument(
        "--delimiter",
        default=None,
        metavar="D",
        help="field separator (default: tab for .tsv, comma for .csv); '\\t' or 'tab' mean a tab",
    )


def from_args(args: argparse.Namespace) -> Records:
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
) -> Records:
    read = functools.partial(_read, Path(table), Path(root), image_column, caption_column, delimiter)
    return Records(read)


def _read(
    path: Path, root: Path, image_column: str, caption_column: str, delimiter: str | None, records: Records
) -> Iterator[Sample | Skip]:
    if not path.is_file():
        raise SourceError(f"{path}: no such table")
    sep = _delimiter(path, delimiter)
    if not root.is_dir():
        raise SourceError(f"{root}: no such image directory")
    rows = functools.partial(_rows, path, sep, image_column, caption_column)
    yield from grouped(rows, lambda image, captions: sample_under(root, image, image, captions), records, str(path))


def _rows(path: Path, sep: str, image_column: str, caption_column: str) -> Iterator[Row | Skip]:
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
            # Too few or too many fields means the columns cannot be trusted, not just one value.
            if len(row) != len(header) or not row[i_image].strip():
                yield Skip(f"{path.name}:{reader.line_num}", "malformed_annotation")
                continue
            yield Row(row[i_image], row[i_caption])
