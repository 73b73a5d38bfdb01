"""Dataset layouts, one small module each, all yielding `Sample`s (or `Skip`s) in a stable order.

A source only parses annotations and says where each image is; reading the bytes is left to
the converter's workers (`read_image`), so that many files are read in parallel. Its
`iter_samples` returns `Records`: nothing is opened before the first record is asked for, and
then the source says how many records to expect, for the converter's progress bar.
Skip reasons are those of pipeline/skips.py.
"""
from __future__ import annotations

import csv as _csv  # not `csv`: that name is the sibling module pipeline.sources.csv
import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.skips import MAX_FILE_BYTES

# Where an image's encoded bytes are: the bytes themselves (e.g. from a tar stream), a file
# path, or (zip archive path, member name).
ImageRef = bytes | str | tuple[str, str]


class Sample(NamedTuple):
    uid: str  # unique within the dataset; recorded in the manifest's `ids`
    image: ImageRef
    captions: list[str]  # raw; the converter cleans, de-duplicates nothing, keeps up to K


class Skip(NamedTuple):
    """A record the source could not turn into a sample; counted by `reason` in the manifest."""

    uid: str
    reason: str  # a key of pipeline.skips.SKIPPED, e.g. "malformed_annotation"


class SourceError(ValueError):
    """A source that cannot be read at all; the message is one line naming the file."""


class Records(Iterator[Sample | Skip]):
    """A source's records, read lazily. `total`: how many records the source will yield, set
    by `read` once it has read its annotations and before its first record; None while it has
    not, or where it cannot tell without reading everything. Only progress bars read it."""

    def __init__(self, read: Callable[[Records], Iterator[Sample | Skip]]) -> None:
        self.total: int | None = None
        self._records = read(self)  # a generator: it runs from the first next()

    def __next__(self) -> Sample | Skip:
        return next(self._records)


def join_under(root: Path, relative: str) -> str | None:
    """root/relative, or None when an annotation's path is absolute or climbs out of root."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return str(root / rel)


def sample_under(root: Path, relative: str, uid: str, captions: list[str]) -> Sample | Skip:
    """The sample of an image at root/relative; a malformed annotation when `join_under` refuses the path."""
    path = join_under(root, relative)
    return Skip(uid, "malformed_annotation") if path is None else Sample(uid, path, captions)


def csv_rows(path: Path, reader: Iterator[list[str]]) -> Iterator[list[str]]:
    """A csv reader's rows, with the csv module's own errors (a runaway quote, a field past the
    size limit) turned into a one-line SourceError naming the file and line."""
    try:
        yield from reader
    except _csv.Error as err:
        line = getattr(reader, "line_num", "?")
        raise SourceError(f"{path}: line {line}: {err}") from None


def read_json_file(path: Path) -> Any:
    """A whole annotation file, decoded leniently: one bad byte in one caption must not lose the file."""
    if not path.is_file():
        raise SourceError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_image(ref: ImageRef) -> bytes:
    """The encoded bytes behind a reference; FileNotFoundError when the file or member is absent."""
    if isinstance(ref, bytes):
        return ref
    if isinstance(ref, str):
        info = os.stat(ref)  # FileNotFoundError: the converter counts missing_file
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{ref}: not a regular file")  # a FIFO or a device would never end
        if info.st_size > MAX_FILE_BYTES:
            raise OSError(f"{ref}: {info.st_size} bytes")
        return Path(ref).read_bytes()
    archive, member = ref
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(member)
        except KeyError:
            raise FileNotFoundError(f"{archive}: no member {member}") from None
