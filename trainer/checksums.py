"""A checkpoint's `checksums.json`: the size and sha256 of every file in it, and the check against it.

A copy that lost a file, a disk that flipped a bit or a transfer cut short would otherwise be
found only by torch's unpickler, deep in DeepSpeed's load, with a traceback that says nothing
about which file (or advises `weights_only=False`, which must never be followed). With the
manifest, a resume tells an intact checkpoint from a damaged one before loading anything.

Hashing is shared: before the save's barrier each rank hashes the files it wrote itself (its
ZeRO partitions and its loader state, still in its page cache) into a piece of the manifest;
after it, rank 0 merges the pieces and hashes the rest (its model states, `model.safetensors`,
`meta.json`, and any file whose name does not say which rank wrote it). Verifying is shared
the same way: each rank checks every world-th file.

A file that matches its checksum can still be refused by torch's weights-only unpickler (a
checkpoint from elsewhere); `load_failure` says why in a few words, never with torch's advice to
load it with `weights_only=False`, which would let the file run code.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.schema import sha256_file

MANIFEST = "checksums.json"
_PIECE = ".checksums-rank-"  # a rank's share of the manifest, merged and removed by rank 0
VERSION = 1


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is missing, truncated, altered or unreadable; the message names it."""


def writer_rank(name: str) -> int | None:
    """The rank that writes the checkpoint file `name`, as its name says; None when it does not."""
    if m := re.fullmatch(r"rank-(\d+)\.pt", name):  # slipstream's per-rank loader and RNG state
        return int(m[1])
    if m := re.search(r"(?:^|_)pp_rank_(\d+)_", name):  # DeepSpeed's ZeRO partitions: zero_pp_rank_R_mp_rank_00_...
        return int(m[1])
    if re.fullmatch(r"mp_rank_\d+_model_states\.pt", name):  # DeepSpeed's model states, from data-parallel rank 0
        return 0
    return None


def _record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a finished file, synced first: the manifest must describe what is on disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def write_piece(directory: Path, rank: int) -> None:
    """This rank's own files synced and hashed (call once they are all written, before the barrier)."""
    mine = {name: _record(directory / name) for name in _files(directory) if writer_rank(Path(name).name) == rank}
    write_json_atomic(directory / f"{_PIECE}{rank:05d}.json", mine)


def write_manifest(directory: Path) -> None:
    """The ranks' pieces merged and every file they do not cover hashed here, written as the
    manifest (rank 0, after every rank has written its files and its piece)."""
    directory = Path(directory)
    pieces = sorted(directory.glob(f"{_PIECE}*.json"))
    files: dict[str, Any] = {}
    for piece in pieces:
        files.update(json.loads(piece.read_text()))
    for name in _files(directory):
        if name not in files and name != MANIFEST and not Path(name).name.startswith(_PIECE):
            files[name] = _record(directory / name)
    write_json_atomic(directory / MANIFEST, {"version": VERSION, "files": dict(sorted(files.items()))})
    for piece in pieces:
        piece.unlink()


def listed(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entries (file name -> size and sha256); DamagedCheckpoint if it cannot be read."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise DamagedCheckpoint(f"{manifest}: missing")
    try:
        text = manifest.read_text()
        files = json.loads(text)["files"] if text.strip() else None
        if files is None:
            raise DamagedCheckpoint(f"{manifest}: empty")
        if not isinstance(files, dict) or not all(isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise TypeError
    except DamagedCheckpoint:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(f"{manifest}: unreadable (not the manifest slipstream writes)") from None
    return files


def verify(directory: Path, names: Collection[str] | None = None) -> None:
    """DamagedCheckpoint naming the first file (of `names`, default all the manifest lists) that is
    missing or differs from the manifest. Sizes are compared first: a truncation costs no hashing."""
    directory = Path(directory)
    files = listed(directory)
    wanted = sorted(files) if names is None else sorted(names)
    for name in wanted:
        if name not in files:
            raise DamagedCheckpoint(f"{directory / MANIFEST}: does not list {name}")
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path}: missing")
        size = path.stat().st_size
        if size != files[name]["size"]:
            how = "truncated" if size < files[name]["size"] else "grown"
            raise DamagedCheckpoint(f"{path}: {how} ({size} bytes, {files[name]['size']} when it was written)")
    for name in wanted:
        path = directory / name
        if sha256_file(path) != files[name]["sha256"]:
            raise DamagedCheckpoint(f"{path}: contents differ from when it was written (sha256 mismatch)")


@contextlib.contextmanager
def recording_loads(engine: Any) -> Iterator[list[str]]:
    """The paths DeepSpeed's checkpoint engine is asked to load, in order: its own errors do not say which file failed."""
    paths: list[str] = []
    loader = getattr(engine, "checkpoint_engine", None)
    if loader is None:
        yield paths
        return
    original, shadowed = loader.load, "load" in vars(loader)

    def load(path: str, map_location: Any = None) -> Any:
        paths.append(str(path))
        return original(path, map_location=map_location)

    loader.load = load
    try:
        yield paths
    finally:
        if shadowed:
            loader.load = original
        else:
            del loader.load  # the class's method again


def load_failure(err: BaseException) -> str:
    """Why a load failed, in a few words and without torch's advice to load with weights_only=False."""
    text = str(err)
    if m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"it holds a Python object, {m[1]}, that a weights-only load refuses"
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text or "Weights only" in text:
        return "not a weights-only torch file"
    if isinstance(err, EOFError) or "central directory" in text or "failed reading zip archive" in text:
        return "truncated"
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
