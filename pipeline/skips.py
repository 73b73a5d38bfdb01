"""Why a source record is not in a converted dataset, and why a caption is not kept: one
vocabulary for every source and for the converter, and the log that names each skipped record.

A record is counted once, under the first rule it breaks, in this order: what its source says
of the annotation (malformed_annotation, or duplicate_id for an image record listed twice),
then its file (missing_file, unreadable_file), then the image's bytes (empty_file, too_large,
too_small, undecodable), then its captions (no_caption), and last its id against the samples
already kept (duplicate_id). The image comes before the captions so that a broken file is
reported as broken whether or not it has a caption. An annotation that is present but empty is never
malformed: an empty caption is dropped like any caption that cleans to nothing.

The manifest counts skips under `skipped` and dropped captions under `captions_dropped`;
`skipped.jsonl` beside it holds one line per skipped record: `{"id", "reason"}`, plus `path`
(the image file or zip member, where the record names one) and `detail` (what was wrong, where
there is more to say, e.g. the image's size).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 1 << 28  # 256 MiB: no training image is larger; a bigger "image" is read no further
MAX_PIXELS = 1 << 26  # 67 Mpx: past this a header is treated as a decompression bomb
MIN_SIDE = 8  # smaller images carry nothing a 224 px crop can use

SKIPPED: dict[str, str] = {
    "malformed_annotation": "the annotation cannot be used: a wrong type or missing field, a row with the wrong "
    "number of columns or no image path, a path that leaves the image root, a caption for an image the file does not list",
    "duplicate_id": "an image record whose id an earlier record already has (a COCO image listed twice, a.jpg beside "
    "a.png in a folder); the earlier one is kept. Table rows naming the same image are its captions, not duplicates",
    "missing_file": "the image file, zip member or tar member does not exist",
    "unreadable_file": f"the image exists but cannot be read: not a regular file, over {MAX_FILE_BYTES >> 20} MiB, "
    "a corrupt zip, no permission",
    "empty_file": "the image file has zero bytes",
    "too_large": f"the image header claims more than {MAX_PIXELS} pixels (a decompression bomb): refused before decoding",
    "too_small": f"the image's shorter side is below {MIN_SIDE} pixels (a tracking pixel)",
    "undecodable": "PIL cannot identify the bytes, decode them to the end (a truncated file) or convert them to RGB",
    "no_caption": "no caption is left after cleaning: an image no caption names, an empty sidecar .txt, empty caption cells",
}

CAPTIONS_DROPPED: dict[str, str] = {
    "empty_caption": "a caption of a kept image that is empty after cleaning (whitespace collapsed)",
    "extra_caption": "a caption of a kept image past its first --captions-per-image non-empty ones",
}

SKIP_LOG = "skipped.jsonl"


def entry(uid: str, reason: str, path: str | None = None, detail: str = "") -> dict[str, str]:
    """One line of the skip log."""
    line = {"id": uid, "reason": reason}
    if path:
        line["path"] = path
    if detail:
        line["detail"] = detail
    return line


class SkipLog:
    """`skipped.jsonl`, appended as records are skipped. The manifest records the log's length
    at each complete shard, and only that much of it counts: resuming, or cleaning up after a
    failure, cuts the log back to it."""

    def __init__(self, out_dir: Path, keep_bytes: int = 0) -> None:
        self.path = out_dir / SKIP_LOG
        cut_log(out_dir, keep_bytes)
        # Unbuffered: a forked worker that flushed an inherited buffer on exit would write lines twice.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115  # closed by close()

    def add(self, line: dict[str, Any]) -> None:
        self._file.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))

    def sync(self) -> int:
        """Bytes on disk so far: what the manifest may vouch for."""
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def cut_log(out_dir: Path, keep_bytes: int) -> None:
    """The skip log cut back to what the manifest vouches for (created empty where absent)."""
    with open(out_dir / SKIP_LOG, "ab") as f:
        f.truncate(keep_bytes)


def verified_marks(out_dir: Path, marks: list[tuple[int, int]]) -> int:
    """How many of the (bytes, lines) marks, in order, the log on disk still matches: its
    first `bytes` bytes hold `lines` whole lines."""
    path = out_dir / SKIP_LOG
    if not path.exists():
        return sum(1 for _ in itertools.takewhile(lambda mark: mark == (0, 0), marks))
    with open(path, "rb") as f:
        position, counted, last = 0, 0, b"\n"
        for n, (size, lines) in enumerate(marks):
            chunk = f.read(size - position) if size >= position else b""
            if position + len(chunk) != size:
                return n
            position, counted, last = size, counted + chunk.count(b"\n"), chunk[-1:] or last
            if counted != lines or last != b"\n":
                return n
    return len(marks)


def read_skipped(directory: str | Path, limit: int) -> Iterator[dict[str, Any]]:
    """The first `limit` entries of a converted dataset's skip log (none for a dataset that predates it)."""
    path = Path(directory) / SKIP_LOG
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n >= limit:
                return
            yield json.loads(line)
