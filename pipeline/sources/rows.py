"""One row per caption -> one sample per image: how the table layouts (csv, cc's .tsv) are read.

Flickr30k's table, and many others, list an image once per caption. The rows that name the
same image become one sample holding all their captions, in row order, wherever the rows
are in the file; the converter keeps the first --captions-per-image of them and counts the
rest as `extra_caption`.

The table is read twice. The first pass keeps an 8-byte hash of each row's image (about
100 MB for 12 million rows) to find the last row of every image; the second yields each
image at its last row, so only images with rows still to come are held in memory. An image
named by one row, or by adjacent rows, is yielded where it stands: the file's order is kept.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from pipeline.sources import Records, Sample, Skip, SourceError


class Row(NamedTuple):
    image: str  # the image as the table names it: rows naming the same image are its captions
    caption: str


def _hash(image: str) -> int:
    # Stable across runs (Python's hash() of a str is salted), so a resumed conversion sees the same order.
    digest = hashlib.blake2b(image.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _repeated_and_last(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(row's image has other rows, row is its image's last, number of images), per row."""
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in row order
    same = hashes[order][1:] == hashes[order][:-1]  # sorted position p and p+1 name one image
    repeated = np.zeros(len(hashes), dtype=bool)
    repeated[order[1:][same]] = repeated[order[:-1][same]] = True
    last = np.ones(len(hashes), dtype=bool)
    last[order[:-1][same]] = False
    return repeated, last, len(hashes) - int(same.sum())


def grouped(
    read: Callable[[], Iterator[Row | Skip]],
    make: Callable[[str, list[str]], Sample | Skip],
    records: Records,
    name: str,
) -> Iterator[Sample | Skip]:
    """`make(image, captions)` once per image of the table `read()` yields (called twice), and
    its Skips where they stand; sets `records.total`. `name`: the table, for errors."""
    hashes, skips = array("Q"), 0
    for row in read():
        if isinstance(row, Skip):
            skips += 1
        else:
            hashes.append(_hash(row.image))
    repeated, last, images = _repeated_and_last(np.frombuffer(hashes, dtype=np.uint64))
    records.total = images + skips
    pending: dict[str, list[str]] = {}  # captions of images whose last row is still to come
    i = -1
    for row in read():
        if isinstance(row, Skip):
            yield row
            continue
        i += 1
        if i >= len(hashes):
            raise SourceError(f"{name}: the table changed while it was read")
        if not repeated[i]:
            yield make(row.image, [row.caption])
            continue
        pending.setdefault(row.image, []).append(row.caption)
        if last[i]:
            yield make(row.image, pending.pop(row.image))
    if i + 1 != len(hashes):
        raise SourceError(f"{name}: the table changed while it was read")
    # Left here only when two images' hashes collided (one in 2**64 per pair): yielded last, whole.
    for image, captions in pending.items():
        yield make(image, captions)
