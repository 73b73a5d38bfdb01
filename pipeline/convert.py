"""Conversion: any source's (uid, image_bytes, captions) stream -> sharded schema-v1 .beton files.

Each sample is normalised and tokenised before it reaches FFCV's writer; a sample that
cannot be is skipped and counted by reason. Shards and the manifest are written under a
temporary directory that is renamed into place only when everything is complete.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Union

import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_json_atomic
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


def _write_shard(path: Path, rows: list[Prepared], first_index: int, options: ConvertOptions) -> dict[str, Any]:
    from pipeline.ffcv_compat import DatasetWriter

    tmp = path.with_name(path.name + ".partial")
    fields = ffcv_fields(options.captions_per_image, CONTEXT_LENGTH, options.max_side)
    writer = DatasetWriter(str(tmp), fields, num_workers=min(options.n_workers, max(1, len(rows) // 64)))
    with _fork_safe():
        writer.from_indexed_dataset(_ShardRows(rows, first_index), chunksize=64)
    tmp.replace(path)
    return {"file": path.name, "samples": len(rows), "sha256": sha256_file(path)}


def convert(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    *,
    source: str,
    options: ConvertOptions = ConvertOptions(),
    progress: bool = True,
) -> dict[str, Any]:
    """Write `out_dir/shard-*.beton` and `out_dir/manifest.json`; return the manifest."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise DatasetError(f"{out_dir}: already holds a converted dataset; remove it or choose another --out")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir}: exists and is not an empty directory; choose another --out")
    work_dir = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        manifest = _convert_into(samples, work_dir, source, options, progress)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        work_dir.replace(out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return manifest


def _convert_into(
    samples: Iterable[RawSample], work_dir: Path, source: str, options: ConvertOptions, progress: bool
) -> dict[str, Any]:
    if options.limit:
        samples = (s for i, s in zip(range(options.limit), samples))
    skipped: Counter[str] = Counter()
    ids: list[str] = []
    shards: list[dict[str, Any]] = []
    rows: list[Prepared] = []
    started = time.perf_counter()
    bar = tqdm(desc=f"convert {source}", unit="img", disable=not progress or os.environ.get("CI") == "true")
    for item in _prepared_stream(samples, options):
        bar.update(1)
        if isinstance(item, BadSample):
            skipped[item.reason] += 1
            continue
        rows.append(item)
        ids.append(item.uid)
        if len(rows) == options.shard_size:
            shards.append(_write_shard(work_dir / shard_name(len(shards)), rows, len(ids) - len(rows), options))
            rows = []
    bar.close()
    if rows:
        shards.append(_write_shard(work_dir / shard_name(len(shards)), rows, len(ids) - len(rows), options))
    if not ids:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "the source yielded nothing"
        raise DatasetError(f"{source}: no usable samples ({reasons})")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "samples": len(ids),
        "skipped": dict(sorted(skipped.items())),
        "shards": shards,
        "tokenizer": TOKENIZER_NAME,
        "context_length": CONTEXT_LENGTH,
        "captions_per_image": options.captions_per_image,
        "max_side": options.max_side,
        "quality": options.quality,
        "seconds": round(time.perf_counter() - started, 2),
        "ids": ids,
    }
    write_json_atomic(work_dir / MANIFEST, manifest)
    return manifest
