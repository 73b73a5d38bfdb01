"""Skipped records are named in skipped.jsonl beside the manifest, the same after a resume;
the conversion's bar has a label and a length, and FFCV's own bars stay silent."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert import ConvertOptions, convert
from pipeline.schema import MANIFEST
from pipeline.skips import SKIP_LOG
from pipeline.sources import Sample, Skip, folder

OPTS = ConvertOptions(max_side=64, captions_per_image=2, shard_size=6, workers=1)


def _jpeg(rng: np.random.Generator, size: tuple[int, int] = (40, 32)) -> bytes:
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    a, b, c = rng.uniform(0, 255, 3)
    pixels = np.stack([a * xx + 40, b * yy + 20, c * (1 - xx) * yy + 10], axis=-1).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _captioned_folder(images: Path, n: int, *, seed: int) -> Path:
    """n random JPEGs with a one-line caption each, as the folder source reads them."""
    images.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        (images / f"{i}.jpg").write_bytes(_jpeg(rng))
        (images / f"{i}.txt").write_text(f"caption {i}\n")
    return images


def _records(tmp: Path, seed: int) -> tuple[list, list[dict]]:
    """Good samples with bad ones scattered through, and the skip log they must produce."""
    rng = np.random.default_rng(seed)
    records, expected = [], []
    for i in range(24):
        uid, kind = f"r{i:02d}", int(rng.integers(0, 6)) if i % 3 else -1
        if kind == 0:
            records.append(Sample(uid, str(tmp / f"{uid}-gone.jpg"), ["never fetched"]))
            expected.append({"id": uid, "reason": "missing_file", "path": str(tmp / f"{uid}-gone.jpg")})
        elif kind == 1:
            records.append(Skip(uid, "malformed_annotation"))
            expected.append({"id": uid, "reason": "malformed_annotation"})
        elif kind == 2:
            records.append((uid, _jpeg(rng, (4, 40)), ["a sliver"]))
            expected.append({"id": uid, "reason": "too_small", "detail": "4x40"})
        elif kind == 3:
            records.append((uid, _jpeg(rng), ["  "]))
            expected.append({"id": uid, "reason": "no_caption"})
        elif kind == 4 and i > 1:
            records.append(("r01", _jpeg(rng), ["same id as an earlier kept one"]))
            expected.append({"id": "r01", "reason": "duplicate_id"})
        else:
            records.append((uid, _jpeg(rng), [f"picture {i}", f"another of {i}", "a third, dropped"]))
    return records, expected


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SKIP_LOG).read_text(encoding="utf-8").splitlines()]


def test_each_skipped_record_is_named_with_its_reason(tmp_path: Path) -> None:
    records, expected = _records(tmp_path, seed=1)
    manifest = convert(records, tmp_path / "out", source="test", options=OPTS, progress=False)
    assert _log(tmp_path / "out") == expected
    by_reason: dict[str, int] = {}
    for line in expected:
        by_reason[line["reason"]] = by_reason.get(line["reason"], 0) + 1
    assert manifest["skipped"] == dict(sorted(by_reason.items())) and manifest["skipped_log"] == SKIP_LOG


def test_verify_notices_a_log_that_disagrees_with_the_manifest(tmp_path: Path) -> None:
    from pipeline.verify import verify

    records, expected = _records(tmp_path, seed=7)
    convert(records, tmp_path / "out", source="test", options=OPTS, progress=False)
    assert verify(tmp_path / "out", progress=False)[1] == []
    log = tmp_path / "out" / SKIP_LOG
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[1:]))  # one name lost
    problems = verify(tmp_path / "out", progress=False)[1]
    assert problems == [f"{log}: names {len(expected) - 1} skipped records; the manifest counts {len(expected)}"]


def test_a_dataset_with_no_skips_has_an_empty_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    convert([(f"u{i}", _jpeg(rng), ["c"]) for i in range(3)], tmp_path / "out", source="test", options=OPTS, progress=False)
    assert (tmp_path / "out" / SKIP_LOG).read_bytes() == b""


def test_an_interrupted_conversion_resumes_to_the_same_log(tmp_path: Path) -> None:
    records, _ = _records(tmp_path, seed=3)
    convert(records, tmp_path / "reference", source="test", options=OPTS, progress=False)

    def dies_after(n: int):
        yield from records[:n]
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(dies_after(17), out, source="test", options=OPTS, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"] and manifest["shards"]
    # Cut back to what the last complete shard vouches for...
    assert (out / SKIP_LOG).stat().st_size == manifest["shards"][-1]["skipped_log_bytes"]
    # ...and a SIGKILL leaves lines past it, which resuming drops.
    with open(out / SKIP_LOG, "ab") as f:
        f.write(b'{"id": "written after the last shard", "reason": "undecodable"}\n')
    convert(records, out, source="test", options=OPTS, resume=True, progress=False)
    assert (out / SKIP_LOG).read_bytes() == (tmp_path / "reference" / SKIP_LOG).read_bytes()
    done, ref = json.loads((out / MANIFEST).read_text()), json.loads((tmp_path / "reference" / MANIFEST).read_text())
    assert {k: v for k, v in done.items() if k != "seconds"} == {k: v for k, v in ref.items() if k != "seconds"}


def test_a_damaged_log_makes_resume_convert_its_shards_again(tmp_path: Path) -> None:
    records, _ = _records(tmp_path, seed=4)
    convert(records, tmp_path / "reference", source="test", options=OPTS, progress=False)
    out = tmp_path / "out"

    def dies_after(n: int):
        yield from records[:n]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(dies_after(20), out, source="test", options=OPTS, progress=False)
    shards = json.loads((out / MANIFEST).read_text())["shards"]
    first_skip = next(i for i, s in enumerate(shards) if s["skipped_log_bytes"] > 0)
    (out / SKIP_LOG).write_bytes(b"")  # lost: no shard that vouches for a skip can be trusted
    convert(records, out, source="test", options=OPTS, resume=True, progress=False)
    assert (out / SKIP_LOG).read_bytes() == (tmp_path / "reference" / SKIP_LOG).read_bytes()
    for name in [s["file"] for s in shards[first_skip:]]:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_the_bar_is_labelled_with_a_total_and_ffcv_draws_none(tmp_path: Path, monkeypatch, capsys) -> None:
    import ffcv.writer

    drawn = []

    class Recorder:  # what FFCV's writer would draw its per-shard bar with
        def __init__(self, *args, **kwargs) -> None:
            drawn.append(kwargs)

        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(ffcv.writer, "tqdm", Recorder)
    monkeypatch.setenv("CI", "false")
    images = _captioned_folder(tmp_path / "images", 9, seed=5)
    convert(folder.iter_samples(images), tmp_path / "out", source="folder", options=OPTS, progress=True)
    assert drawn == []  # no unlabelled bar per shard
    err = capsys.readouterr().err
    assert "convert folder" in err and "9/9" in err  # labelled, with the source's length
    assert ffcv.writer.tqdm is Recorder  # FFCV is left as it was found


def test_the_bar_total_follows_limit(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CI", "false")
    images = _captioned_folder(tmp_path / "images", 6, seed=6)
    options = ConvertOptions(max_side=64, shard_size=4, workers=1, limit=5)
    convert(folder.iter_samples(images), tmp_path / "out", source="folder", options=options, progress=True)
    assert "5/5" in capsys.readouterr().err
