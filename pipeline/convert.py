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

import contextlib
import functools
import gc
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Union

import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_json_atomic, write_text_atomic
from pipeline.images import BadSample, EncodedImage, normalize_image
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
RawSample = Union[Sample, Skip, tuple[str, bytes, list[str]]]  # a source's records


@dataclass(frozen=True)
class ConvertOptions:
    max_side: int = 384
    quality: int = 90
    captions_per_image: int = 5
    shard_size: int = 100_000
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
        except OSError as err:
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


@contextlib.contextmanager
def _fork_safe() -> Iterator[None]:
    """Fork children that never garbage-collect what they inherit.

    A forked child that collects an inherited object whose finaliser touches the parent's
    threads (a DALI pipeline's does) segfaults, and FFCV's writer then waits for it forever.
    Collect in the parent first, then freeze the survivors out of the children's collector.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _prepared_stream(samples: Iterable[RawSample], options: ConvertOptions) -> Iterator[Prepared | BadSample]:
    work = functools.partial(prepare, options=options)
    if options.n_workers <= 1:
        yield from map(work, samples)
        return
    tokenize(["load the vocabulary once, before the workers fork"])
    with _fork_safe(), multiprocessing.get_context("fork").Pool(options.n_workers) as pool:
        yield from pool.imap(work, samples, chunksize=16)


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
    with _fork_safe():
        writer.from_indexed_dataset(_ShardRows(rows, first_index), chunksize=256)
    partial.replace(path)
    return {"file": path.name, "ids": ids_path.name, "samples": len(rows), "sha256": sha256_file(path)}


def _settings(source: str, options: ConvertOptions) -> dict[str, Any]:
    """What must match for a resumed conversion to continue the same dataset."""
    return {
        "source": source,
        "tokenizer": TOKENIZER_NAME,
        "context_length": CONTEXT_LENGTH,
        "captions_per_image": options.captions_per_image,
        "max_side": options.max_side,
        "quality": options.quality,
        "shard_size": options.shard_size,
    }


@dataclass
class _State:
    shards: list[dict[str, Any]] = field(default_factory=list)
    consumed: int = 0  # source records read into complete shards (samples and skips)
    skipped: Counter = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)  # uids accepted so far, for duplicate detection

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
        state.consumed, state.skipped = shard["consumed"], Counter(shard["skipped"])
        ids = (out_dir / shard["ids"]).read_text(encoding="utf-8").splitlines()
        state.seen.update(json.loads(line) for line in ids)
    keep = {MANIFEST} | {s["file"] for s in state.shards} | {s["ids"] for s in state.shards}
    for path in out_dir.iterdir():
        if path.name not in keep and path.name.startswith("shard-"):
            path.unlink()
    return state


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
    return _State(), created


def convert(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    *,
    source: str,
    options: ConvertOptions = ConvertOptions(),
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `out_dir/shard-*.beton` (+ `.ids`) and `out_dir/manifest.json`; return the manifest."""
    out_dir = Path(out_dir)
    settings = _settings(source, options)
    state, created = _start(out_dir, settings, resume)
    started = time.perf_counter()
    try:
        _convert_into(samples, out_dir, settings, state, options, progress, started)
    except BaseException:
        for partial in out_dir.glob(f"*{PARTIAL}"):
            partial.unlink()
        if created and not state.shards:
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth resuming: leave nothing
        raise
    manifest = _manifest(settings, state, True, time.perf_counter() - started)
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def _convert_into(
    samples: Iterable[RawSample],
    out_dir: Path,
    settings: dict[str, Any],
    state: _State,
    options: ConvertOptions,
    progress: bool,
    started: float,
) -> None:
    records = itertools.islice(samples, state.consumed, options.limit or None)
    consumed, skipped = state.consumed, Counter(state.skipped)
    rows: list[Prepared] = []

    def flush() -> None:
        shard = _write_shard(out_dir, len(state.shards), rows, state.samples, options)
        shard.update(consumed=consumed, skipped=dict(sorted(skipped.items())))
        state.shards.append(shard)
        state.consumed, state.skipped = consumed, Counter(skipped)
        write_json_atomic(out_dir / MANIFEST, _manifest(settings, state, False, time.perf_counter() - started))
        rows.clear()

    quiet = not progress or os.environ.get("CI") == "true"
    with tqdm(desc=f"convert {settings['source']}", unit="img", initial=consumed, disable=quiet) as bar:
        for item in _prepared_stream(records, options):
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
