"""Conversion: a source's records -> sharded schema-v1 .beton files, restartable at any moment.

Each sample is normalised and tokenised (in worker processes) before it reaches FFCV's
writer; one that cannot be is skipped, counted by reason and named in `skipped.jsonl`
(pipeline/skips.py: the reasons), and the conversion goes on.

On disk, a shard appears only when complete: its ids file and its .beton are written under
temporary names and renamed, then the manifest is rewritten atomically to list it, with the
number of source records consumed so far. So a converter killed at any moment leaves
complete shards and a manifest marked incomplete; `resume=True` checks the listed shards
against their checksums, drops anything else, skips the records already consumed and goes
on, producing the same files, byte for byte, as an uninterrupted run (pipeline/convert_state.py).
A shard whose write fails (a full disk, in FFCV's writer or its worker: pipeline/shard_writer.py)
is an error naming it, and leaves the same resumable state as a kill.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_json_atomic, write_text_atomic
from pipeline.convert_state import State, manifest, remove_unlisted, skip_consumed, start
from pipeline.images import BadSample, EncodedImage, normalize_image
from pipeline.process_pool import ordered_map
from pipeline.schema import MANIFEST, DatasetError, ffcv_fields, sha256_file, shard_name
from pipeline.shard_writer import write_beton
from pipeline.skips import SkipLog, entry
from pipeline.sources import Sample, Skip, read_image
from pipeline.text import CONTEXT_LENGTH, TOKENIZER_NAME, clean_caption, tokenize

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
    dropped: dict[str, int]  # captions not kept, by reason (pipeline.skips.CAPTIONS_DROPPED)


def prepare(sample: RawSample, options: ConvertOptions) -> Prepared | BadSample:
    """Normalise one sample, or say why it is skipped (returned, so pool workers never raise).
    The image is checked before the captions: a broken file is reported as such, captioned or not."""
    if isinstance(sample, Skip):
        return BadSample(sample.reason)
    uid, ref, captions = sample
    try:
        try:
            data = read_image(ref)
        except FileNotFoundError:
            raise BadSample("missing_file") from None
        except Exception as err:  # a corrupt zip member, a permission error, a device file
            raise BadSample("unreadable_file", type(err).__name__) from None
        image = normalize_image(data, max_side=options.max_side, quality=options.quality)
        cleaned = [clean_caption(c) for c in captions]
        kept = [c for c in cleaned if c]
        if not kept:
            raise BadSample("no_caption")
        dropped = {"empty_caption": len(cleaned) - len(kept), "extra_caption": max(0, len(kept) - options.captions_per_image)}
        kept = kept[: options.captions_per_image]
        tokens = np.zeros((options.captions_per_image, CONTEXT_LENGTH), dtype=np.int32)  # (K, 77)
        tokens[: len(kept)] = tokenize(kept)
        text = np.frombuffer("\n".join(kept).encode("utf-8"), dtype=np.uint8)
        return Prepared(uid, image, tokens, len(kept), text, {k: n for k, n in dropped.items() if n})
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
    path = out_dir / shard_name(index)
    ids_path = path.with_suffix(".ids")
    write_text_atomic(ids_path, "".join(json.dumps(row.uid) + "\n" for row in rows))
    fields = ffcv_fields(options.captions_per_image, CONTEXT_LENGTH, options.max_side)
    # The JPEGs alone are a size the shard cannot be under, even on a filesystem that compresses.
    jpeg_bytes = sum(row.image.jpeg.nbytes for row in rows)
    write_beton(path, fields, _ShardRows(rows, first_index), min_bytes=jpeg_bytes)
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
    """Write `out_dir/shard-*.beton` (+ `.ids`), `out_dir/skipped.jsonl` and `out_dir/manifest.json`;
    return the manifest. `extra`: a source's own manifest keys (e.g. the class list of a labelled
    dataset). A `samples` with a `total` attribute (pipeline.sources.Records) gives the bar its length."""
    out_dir = Path(out_dir)
    settings = _settings(source, options, extra)
    state, created = start(out_dir, settings, resume)
    started = time.perf_counter()
    try:
        _convert_into(samples, out_dir, settings, state, options, progress, started)
    except BaseException:
        if created and not state.shards:
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth resuming: leave nothing
        elif out_dir.is_dir():
            remove_unlisted(out_dir, state)
            if not state.shards:  # an --out that existed empty: leave it empty again
                (out_dir / MANIFEST).unlink(missing_ok=True)
        raise
    done = manifest(settings, state, True, time.perf_counter() - started)
    write_json_atomic(out_dir / MANIFEST, done)
    return done


def _where(record: RawSample) -> str | None:
    """The file a record names, for the skip log: a path, `archive:member`, or None (bytes in hand)."""
    if isinstance(record, Skip):
        return None
    ref = record[1]
    return ref if isinstance(ref, str) else f"{ref[0]}:{ref[1]}" if isinstance(ref, tuple) else None


def _bar(samples: Iterable[RawSample], options: ConvertOptions, bar: tqdm) -> None:
    """Give the bar its length once the source knows it (after reading its annotations)."""
    total = getattr(samples, "total", None)
    if total is not None:
        bar.total = min(total, options.limit) if options.limit else total
        bar.refresh()


def _convert_into(
    samples: Iterable[RawSample],
    out_dir: Path,
    settings: dict[str, Any],
    state: State,
    options: ConvertOptions,
    progress: bool,
    started: float,
) -> None:
    records = skip_consumed(iter(samples), state, out_dir)
    if options.limit:
        records = itertools.islice(records, max(0, options.limit - state.consumed))
    fed_records: collections.deque[tuple[str, str | None]] = collections.deque()  # (uid, file), in feeding order
    # What is done so far; copied into `state` (what the manifest vouches for) at each complete shard.
    run = State(consumed=state.consumed, skipped=state.skipped.copy(), dropped=state.dropped.copy(), last_uid=state.last_uid)
    rows: list[Prepared] = []

    def fed(records: Iterator[RawSample]) -> Iterator[RawSample]:
        for record in records:
            fed_records.append((record[0], _where(record)))
            yield record

    def commit() -> None:
        state.consumed, state.last_uid, state.log_bytes = run.consumed, run.last_uid, log.sync()
        state.skipped, state.dropped = run.skipped.copy(), run.dropped.copy()

    def flush() -> None:
        bar.set_postfix_str(f"writing {shard_name(len(state.shards))}")
        shard = _write_shard(out_dir, len(state.shards), rows, state.samples, options)
        commit()
        state.shards.append({**shard, **state.checkpoint()})
        write_json_atomic(out_dir / MANIFEST, manifest(settings, state, False, time.perf_counter() - started))
        rows.clear()
        bar.set_postfix_str(f"{state.samples} kept, {state.skipped.total()} skipped")

    quiet = not progress or os.environ.get("CI") == "true"
    log = SkipLog(out_dir, state.log_bytes)
    with contextlib.closing(log), tqdm(desc=f"convert {settings['source']}", unit="img", initial=state.consumed, disable=quiet) as bar:
        for item in _prepared_stream(fed(records), options):
            if bar.total is None:
                _bar(samples, options, bar)
            run.last_uid, where = fed_records.popleft()  # results come back in feeding order
            run.consumed += 1
            bar.update(1)
            if isinstance(item, BadSample):
                run.skipped[item.reason] += 1
                log.add(entry(run.last_uid, item.reason, where, item.detail))
            elif item.uid in state.seen:
                run.skipped["duplicate_id"] += 1
                log.add(entry(item.uid, "duplicate_id", where))
            else:
                rows.append(item)
                state.seen.add(item.uid)
                run.dropped.update(item.dropped)
                if len(rows) == options.shard_size:
                    flush()
        if rows:
            flush()
        commit()
        if not state.shards:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(run.skipped.items())) or "the source yielded nothing"
            raise DatasetError(f"{settings['source']}: no usable samples ({reasons})")
