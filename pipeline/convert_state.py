"""A conversion's state on disk, and what resuming one trusts of it.

The manifest lists the complete shards; each entry records where the conversion stood when
that shard was complete: source records consumed, the last one's id, skips and dropped
captions so far, and the length of the skip log then. Resuming keeps the leading shards whose
files still match their checksums and whose skip log is still there, cuts the log back to
the last of them, removes everything else, and skips the records already consumed.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.schema import MANIFEST, SCHEMA_VERSION, DatasetError, sha256_file
from pipeline.skips import SKIP_LOG, cut_log, verified_marks


@dataclass
class State:
    shards: list[dict[str, Any]] = field(default_factory=list)
    consumed: int = 0  # source records read into complete shards (samples and skips)
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)  # captions of kept samples, by reason
    seen: set[str] = field(default_factory=set)  # uids accepted so far, for duplicate detection
    last_uid: str | None = None  # uid of the last record consumed: resuming checks the source still has it there
    log_bytes: int = 0  # length of the skip log when the last complete shard was written

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def checkpoint(self) -> dict[str, Any]:
        """What a shard's manifest entry records of the conversion so far."""
        return {
            "consumed": self.consumed,
            "last_uid": self.last_uid,
            "skipped": dict(sorted(self.skipped.items())),
            "captions_dropped": dict(sorted(self.dropped.items())),
            "skipped_log_bytes": self.log_bytes,
        }


def manifest(settings: dict[str, Any], state: State, complete: bool, seconds: float) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        **settings,
        "samples": state.samples,
        "skipped": dict(sorted(state.skipped.items())),
        "captions_dropped": dict(sorted(state.dropped.items())),
        "skipped_log": SKIP_LOG,
        "shards": state.shards,
        "consumed": state.consumed,
        "seconds": round(seconds, 2),
    }


def _verified_shard(out_dir: Path, shard: dict[str, Any]) -> bool:
    beton, ids = out_dir / shard["file"], out_dir / shard["ids"]
    if not beton.is_file() or not ids.is_file() or sha256_file(beton) != shard["sha256"]:
        return False
    return len(ids.read_text(encoding="utf-8").splitlines()) == shard["samples"]


def _resume_state(out_dir: Path, settings: dict[str, Any]) -> State:
    """The complete shards of an interrupted conversion, verified; everything else removed."""
    previous = json.loads((out_dir / MANIFEST).read_text())
    if previous.get("complete"):
        raise DatasetError(f"{out_dir}: the conversion is already complete; nothing to resume")
    changed = [k for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise DatasetError(f"{out_dir}: cannot resume with different {', '.join(changed)} than the interrupted run")
    # A run from before the skip log (no `skipped_log_bytes`) can only keep shards that had no skips.
    marks = [(s.get("skipped_log_bytes", 0), sum(s["skipped"].values())) for s in previous["shards"]]
    logged = verified_marks(out_dir, marks)
    state = State()
    for shard in previous["shards"][:logged]:
        if not _verified_shard(out_dir, shard):
            break  # this shard and everything after it is converted again
        state.shards.append(shard)
        state.consumed, state.last_uid = shard["consumed"], shard["last_uid"]
        state.skipped, state.dropped = Counter(shard["skipped"]), Counter(shard.get("captions_dropped", {}))
        state.log_bytes = shard.get("skipped_log_bytes", 0)
        ids = (out_dir / shard["ids"]).read_text(encoding="utf-8").splitlines()
        state.seen.update(json.loads(line) for line in ids)
    remove_unlisted(out_dir, state)
    return state


def remove_unlisted(out_dir: Path, state: State) -> None:
    """Shard files no manifest lists (a kill mid-shard) and temporary files of atomic writes;
    the skip log is cut back to what the last complete shard vouches for, or removed with none."""
    keep = {MANIFEST} | {s["file"] for s in state.shards} | {s["ids"] for s in state.shards}
    if state.shards:
        keep.add(SKIP_LOG)
        cut_log(out_dir, state.log_bytes)
    for path in out_dir.iterdir():
        ours = path.name.startswith(("shard-", ".shard-", f".{MANIFEST}.tmp-")) or path.name == SKIP_LOG
        if ours and path.name not in keep:
            path.unlink()


def start(out_dir: Path, settings: dict[str, Any], resume: bool) -> tuple[State, bool]:
    """(state to continue from, whether this call created out_dir)."""
    if (out_dir / MANIFEST).exists():
        if resume:
            return _resume_state(out_dir, settings), False
        raise DatasetError(f"{out_dir}: already holds a converted dataset; pass --resume to finish an interrupted one, or choose another --out")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir}: exists and is not an empty directory; choose another --out")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written before any shard, so a kill during the first one still leaves a resumable directory.
    write_json_atomic(out_dir / MANIFEST, manifest(settings, State(), False, 0.0))
    return State(), created


def skip_consumed(records: Iterator[Any], state: State, out_dir: Path) -> Iterator[Any]:
    """The source past the records already in complete shards, after checking it is the same source."""
    if state.consumed == 0:
        return records
    last = next(itertools.islice(records, state.consumed - 1, None), None)
    if last is None or last[0] != state.last_uid:
        raise DatasetError(
            f"{out_dir}: the source changed since the interrupted run (record {state.consumed} was "
            f"{state.last_uid!r}, now {None if last is None else last[0]!r}); convert into a new --out"
        )
    return records
