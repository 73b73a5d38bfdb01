"""webdataset tar shards as img2dataset writes them: `key.jpg` with `key.txt` and/or `key.json`.

A sample's members are consecutive in the tar, so each shard is read once, front to back, in
tarfile's streaming mode (no seeking, no index, works on any file-like stream).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.sources import Records, Sample, Skip, SourceError

NAME = "wds"
HELP = "webdataset .tar shards (img2dataset output): key.jpg with key.txt and/or key.json captions"

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a key has several
WANTED = frozenset(IMAGE_EXTS + ("txt", "json"))
# webdataset's own split: the key is the path up to the first dot of the file name.
KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_ERRORS = (tarfile.TarError, OSError, EOFError)  # corrupt gzip streams raise OSError/EOFError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", required=True, metavar="GLOB_OR_DIR", help="directory of .tar shards, or a glob like 'data/*.tar'"
    )


def from_args(args: argparse.Namespace) -> Records:
    return iter_samples(shards=args.shards)


def find_shards(shards: str | Path) -> list[Path]:
    """The shard files in sorted order, so that sample order does not depend on the file system."""
    path = Path(shards)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES))
    else:
        found = sorted(Path(p) for p in glob.glob(str(shards)))
    found = [p for p in found if p.is_file()]
    if not found:
        raise SourceError(f"{shards}: no .tar shards found")
    return found


def _check_opens(shard: Path) -> None:
    # Reading one header per shard up front makes a foreign or empty file an error before the
    # first sample, not hours into a conversion.
    try:
        with tarfile.open(shard, "r|*") as tar:
            tar.next()
    except TAR_ERRORS as err:
        raise SourceError(f"{shard}: not a readable tar ({err})") from None


def _groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per run of consecutive members sharing a key; unwanted members unread."""
    key: str | None = None
    files: dict[str, bytes] = {}
    for member in tar:
        match = KEY_EXT.match(member.name.removeprefix("./")) if member.isfile() else None
        if match is None:
            continue
        k, ext = match.group(1), match.group(2).lower()
        if k != key:
            if key is not None:
                yield key, files
            key, files = k, {}
        if ext in WANTED and ext not in files:
            files[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]  # a file member
    if key is not None:
        yield key, files


def _sample(uid: str, files: dict[str, bytes]) -> Sample | Skip:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None:
        return Skip(uid, "missing_file")  # captions without an image: nothing to train on
    captions: list[str] = []
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            return Skip(uid, "malformed_annotation")
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            captions = [meta["caption"]]
    if "txt" in files:
        # img2dataset writes the same caption to both files; the .txt is the plain one, keep it alone.
        captions = [files["txt"].decode("utf-8", errors="replace")]
    return Sample(uid, image, captions)


def _without_suffix(name: str) -> str:
    return next((name[: -len(s)] for s in TAR_SUFFIXES if name.endswith(s)), name)


def _expected_samples(paths: list[Path]) -> int | None:
    """The samples img2dataset says it wrote (`NNNNN_stats.json` beside each shard); None when a
    shard has no such file: counting a tar's members means reading it whole."""
    total = 0
    for shard in paths:
        try:
            stats = json.loads(shard.with_name(f"{_without_suffix(shard.name)}_stats.json").read_bytes())
            total += int(stats["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def iter_samples(*, shards: str | Path) -> Records:
    return Records(functools.partial(_read, shards))


def _read(shards: str | Path, records: Records) -> Iterator[Sample | Skip]:
    paths = find_shards(shards)
    for shard in paths:
        _check_opens(shard)
    records.total = _expected_samples(paths)
    common = Path(os.path.commonpath([p.parent for p in paths])) if len(paths) > 1 else paths[0].parent
    for shard in paths:
        # The shard's path below the shards' common folder, suffix dropped: `a/00000.tar` and
        # `b/00000.tar`, or `train.000.tar` and `train.001.tar`, never give the same uids.
        name = shard.relative_to(common).as_posix()
        stem = _without_suffix(name)
        try:
            with tarfile.open(shard, "r|*") as tar:
                for key, files in _groups(tar):
                    yield _sample(f"{stem}/{key}", files)
        except TAR_ERRORS as err:
            # A shard truncated mid-stream: stop loudly rather than convert a silently shorter dataset.
            raise SourceError(f"{shard}: unreadable tar stream ({err})") from None
