"""Conversion: a source's records -> sharded schema-v1 .beton files, restartable at any moment.

Each sample is normalised and tokenised (in worker processes) before it reaches FFCV's
writer; one that cannot be is skipped and counted by reason, and the conversion goes on.

On disk, a shard appears only when complete: its ids file and its .beton are written under
temporary names and renamed, then the manifest is rewritten atomically to list it, with the
number of source records consumed so far. So a converter killed at any moment leaves
complete shards and a manifest marked incomplete; `resume=True` checks the listed shards
against their checksums, drops anything else, skips the records already consumed and goes
on, producing the same shards, byte for byte, as an uninterrupted run.
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_json_atomic, write_text_atomic
from pipeline.images import BadSample, EncodedImage, normalize_image
from pipeline.process_pool import fork_safe, ordered_map
from pipeline.schema import (
    MANIFEST,
    SCHEMA_VERSION,
    DatasetError,
    ffcv_fields,
    sha256_file,
    shard_name,
)
from pipeline.sources import Sample, Skip, read_image
from pipeline.text import CONTEXT_LENGTH, TOKENIZER_NAME, clean_caption, tokenize

PARTIAL = ".partial"  # suffix of a shard being written
RawSample = Sample | Skip | tuple[str, bytes, list[str]]  # a source's records


@dataclass(frozen=True)
class ConvertOptions:
    max_side: int = 384
    quality: int = 90
    captions_per_image: int = 5
    shard_size: int = 10_000  # the parent holds one shard's encoded rows: ~400 MB at 384 px
    workers: int = 0  # 0 = every core
    limit: int = 0  # 0 = no limit

    def __post_init__(self) -> None:
        if self.max_side < 32:
            raise ValueError(f"--max-side must be at least 32, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.captions_per_image < 1:
            raise ValueError(f"--captions-per-image must be at least 1, got {self.captions_per_image}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


class Prepared(NamedTuple):
    uid: str
    image: EncodedImage
    tokens: np.ndarray  # int32 [K, 77]
    n_captions: int
    text: np.ndarray  # uint8 [n_bytes], the captions newline-joined


def prepare(sample: RawSample, options: ConvertOptions) -> Prepared | BadSample:
    """Normalise one sample, or say why it is skipped (returned, so pool workers never raise)."""
    if isinstance(sample, Skip):
        return BadSample(sample.reason, sample.uid)
    uid, ref, captions = sample
    try:
        try:
            data = read_image(ref)
        except FileNotFoundError:
            raise BadSample("missing_file", uid) from None
        except Exception as err:  # a corrupt zip member, a permission error, a device file
            raise BadSample("unreadable_file", f"{uid}: {type(err).__name__}") from None
        image = normalize_image(data, max_side=options.max_side, quality=options.quality)
        cleaned = [c for c in (clean_caption(c) for c in captions) if c]
        if not cleaned:
            raise BadSample("no_caption")
        cleaned = cleaned[: options.captions_per_image]
        tokens = np.zeros((options.captions_per_image, CONTEXT_LENGTH), dtype=np.int32)  # (K, 77)
        tokens[: len(cleaned)] = tokenize(cleaned)
        text = np.frombuffer("\n".join(cleaned).encode("utf-8"), dtype=np.uint8)
        return Prepared(uid, image, tokens, len(cleaned), text)
    except BadSample as bad:
        return bad


class _ShardRows:
    """The indexed dataset FFCV's writer reads: rows in schema field order."""

    def __init__(self, rows: list[Prepared], first_index: int) -> None:
        self.rows, self.first_index = rows, first_index

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        row = self.rows[i]
        return (row.image, row.tokens, row.n_captions, self.first_index + i, row.text)


def _prepared_stream(samples: Iterable[RawSample], options: ConvertOptions) -> Iterator[Prepared | BadSample]:
    """Prepared samples in source order, from `options.n_workers` worker processes."""
    if options.n_workers > 1:
        tokenize(["load the vocabulary once, before the workers fork"])
    try:
        yield from ordered_map(functools.partial(prepare, options=options), samples, options.n_workers)
    except BrokenProcessPool:
        raise DatasetError("a conversion worker died (out of memory?); complete shards are kept: rerun with --resume") from None


def _write_shard(out_dir: Path, index: int, rows: list[Prepared], first_index: int, options: ConvertOptions) -> dict[str, Any]:
    from pipeline.ffcv_compat import DatasetWriter

    path = out_dir / shard_name(index)
    ids_path = path.with_suffix(".ids")
    write_text_atomic(ids_path, "".join(json.dumps(row.uid) + "\n" for row in rows))
    partial = path.with_name(path.name + PARTIAL)
    fields = ffcv_fields(options.captions_per_image, CONTEXT_LENGTH, options.max_side)
    # One writer worker: the rows are already encoded, so the writer only copies bytes, and a
    # single worker lays them out in order, which makes shards reproducible for --resume.
    writer = DatasetWriter(str(partial), fields, num_workers=1)
    with fork_safe():
        writer.from_indexed_dataset(_ShardRows(rows, first_index), chunksize=256)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())  # the manifest will vouch for this shard: it must be on disk first
    partial.replace(path)
    return {"file": path.name, "ids": ids_path.name, "samples": len(rows), "sha256": sha256_file(path)}


def _settings(source: str, options: ConvertOptions, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must match for a resumed conversion to continue the same dataset."""
    return {
        **(extra or {}),
        "source": source,
        "tokenizer": TOKENIZER_NAME,
        "context_length": CONTEXT_LENGTH,
        "captions_per_image": options.captions_per_image,
        "max_side": options.max_side,
        "quality": options.quality,
        "shard_size": options.shard_size,
        "limit": options.limit,
    }


@dataclass
class _State:
    shards: list[dict[str, Any]] = field(default_factory=list)
    consumed: int = 0  # source records read into complete shards (samples and skips)
    skipped: Counter[str] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)  # uids accepted so far, for duplicate detection
    last_uid: str | None = None  # uid of the last record consumed: resuming checks the source still has it there

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)


def _manifest(settings: dict[str, Any], state: _State, complete: bool, seconds: float) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        **settings,
        "samples": state.samples,
        "skipped": dict(sorted(state.skipped.items())),
        "shards": state.shards,
        "consumed": state.consumed,
        "seconds": round(seconds, 2),
    }


def _verified_shard(out_dir: Path, shard: dict[str, Any]) -> bool:
    beton, ids = out_dir / shard["file"], out_dir / shard["ids"]
    if not beton.is_file() or not ids.is_file() or sha256_file(beton) != shard["sha256"]:
        return False
    return len(ids.read_text(encoding="utf-8").splitlines()) == shard["samples"]


def _resume_state(out_dir: Path, settings: dict[str, Any]) -> _State:
    """The complete shards of an interrupted conversion, verified; everything else removed."""
    previous = json.loads((out_dir / MANIFEST).read_text())
    if previous.get("complete"):
        raise DatasetError(f"{out_dir}: the conversion is already complete; nothing to resume")
    changed = [k for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise DatasetError(f"{out_dir}: cannot resume with different {', '.join(changed)} than the interrupted run")
    state = _State()
    for shard in previous["shards"]:
        if not _verified_shard(out_dir, shard):
            break  # this shard and everything after it is converted again
        state.shards.append(shard)
        state.consumed, state.skipped, state.last_uid = shard["consumed"], Counter(shard["skipped"]), shard["last_uid"]
        ids = (out_dir / shard["ids"]).read_text(encoding="utf-8").splitlines()
        state.seen.update(json.loads(line) for line in ids)
    _remove_unlisted(out_dir, state)
    return state


def _remove_unlisted(out_dir: Path, state: _State) -> None:
    """Shard files no manifest lists (a kill mid-shard) and temporary files of atomic writes."""
    keep = {MANIFEST} | {s["file"] for s in state.shards} | {s["ids"] for s in state.shards}
    for path in out_dir.iterdir():
        ours = path.name.startswith(("shard-", ".shard-", f".{MANIFEST}.tmp-"))
        if ours and path.name not in keep:
            path.unlink()


def _start(out_dir: Path, settings: dict[str, Any], resume: bool) -> tuple[_State, bool]:
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
    write_json_atomic(out_dir / MANIFEST, _manifest(settings, _State(), False, 0.0))
    return _State(), created


def convert(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    *,
    source: str,
    options: ConvertOptions = ConvertOptions(),
    resume: bool = False,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out_dir/shard-*.beton` (+ `.ids`) and `out_dir/manifest.json`; return the manifest.
    `extra`: a source's own manifest keys (e.g. the class list of a labelled dataset)."""
    out_dir = Path(out_dir)
    settings = _settings(source, options, extra)
    state, created = _start(out_dir, settings, resume)
    started = time.perf_counter()
    try:
        _convert_into(samples, out_dir, settings, state, options, progress, started)
    except BaseException:
        if created and not state.shards:
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth resuming: leave nothing
        elif out_dir.is_dir():
            _remove_unlisted(out_dir, state)
            if not state.shards:  # an --out that existed empty: leave it empty again
                (out_dir / MANIFEST).unlink(missing_ok=True)
        raise
    manifest = _manifest(settings, state, True, time.perf_counter() - started)
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def _skip_consumed(records: Iterator[RawSample], state: _State, out_dir: Path) -> Iterator[RawSample]:
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


def _convert_into(
    samples: Iterable[RawSample],
    out_dir: Path,
    settings: dict[str, Any],
    state: _State,
    options: ConvertOptions,
    progress: bool,
    started: float,
) -> None:
    records = _skip_consumed(iter(samples), state, out_dir)
    if options.limit:
        records = itertools.islice(records, max(0, options.limit - state.consumed))
    uids: collections.deque[str] = collections.deque()  # uids fed to the workers, in order
    consumed, skipped = state.consumed, Counter(state.skipped)
    rows: list[Prepared] = []

    def fed(records: Iterator[RawSample]) -> Iterator[RawSample]:
        for record in records:
            uids.append(record[0])
            yield record

    def flush() -> None:
        shard = _write_shard(out_dir, len(state.shards), rows, state.samples, options)
        shard.update(consumed=consumed, last_uid=last_uid, skipped=dict(sorted(skipped.items())))
        state.shards.append(shard)
        state.consumed, state.skipped = consumed, Counter(skipped)
        write_json_atomic(out_dir / MANIFEST, _manifest(settings, state, False, time.perf_counter() - started))
        rows.clear()

    quiet = not progress or os.environ.get("CI") == "true"
    with tqdm(desc=f"convert {settings['source']}", unit="img", initial=consumed, disable=quiet) as bar:
        last_uid = state.last_uid
        for item in _prepared_stream(fed(records), options):
            last_uid = uids.popleft()  # results come back in feeding order
            consumed += 1
            bar.update(1)
            if isinstance(item, BadSample):
                skipped[item.reason] += 1
            elif item.uid in state.seen:
                skipped["duplicate_id"] += 1
            else:
                rows.append(item)
                state.seen.add(item.uid)
                if len(rows) == options.shard_size:
                    flush()
    if rows:
        flush()
    state.consumed, state.skipped = consumed, skipped
    if not state.shards:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "the source yielded nothing"
        raise DatasetError(f"{settings['source']}: no usable samples ({reasons})")
