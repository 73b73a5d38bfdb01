"""A converter killed at any moment resumes into the same dataset, byte for byte."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.reader import BetonDataset
from pipeline.schema import DatasetError

N_IMAGES, SHARD = 160, 20


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("restart") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        # Big enough that each one costs a resize, so a kill lands mid-run.
        h, w = rng.integers(400, 640, 2)
        yy, xx = np.mgrid[0:h, 0:w]
        a, b, c = rng.uniform(0.2, 1.0, 3)
        pixels = np.stack([a * 255 * xx / w, b * 255 * yy / h, c * 127 + 0 * xx], -1).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.jpg", quality=90)
        (root / f"{i:04d}.txt").write_text(f"picture number {i}\nanother caption for {i}\n")
    (root / "0007.jpg").write_bytes(b"")  # a skip inside the stream, to be counted once
    return root


def _convert(images: Path, out: Path, *extra: str, workers: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slip", "convert", "folder", "--images", str(images), "--out", str(out),
           "--workers", str(workers), "--shard-size", str(SHARD), "--max-side", "96", *extra]  # fmt: skip
    env = {**os.environ, "CI": "true"}
    # A runner started in the background without job control ignores SIGINT, and its children
    # inherit that; the converter under test gets the default disposition, as at a terminal.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name.startswith(("shard-", "skipped."))}


def _listed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written (it is replaced atomically)
        return 0


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = _convert(images, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return out


def _first_shard_in_progress(out: Path) -> bool:
    return (out / "shard-00000.ids").exists() and _listed_shards(out) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,workers,when",
    [
        (signal.SIGINT, 1, "after two shards"),
        (signal.SIGKILL, 1, "after two shards"),
        (signal.SIGKILL, 2, "after two shards"),
        (signal.SIGKILL, 1, "during the first shard"),
    ],
    ids=["sigint", "sigkill", "sigkill-pool", "sigkill-first-shard"],
)
def test_killed_conversion_resumes_to_the_same_bytes(
    images: Path, reference: Path, tmp_path: Path, sig: int, workers: int, when: str
) -> None:
    out = tmp_path / "out"
    proc = _convert(images, out, workers=workers)
    ready = (lambda: _listed_shards(out) >= 2) if when == "after two shards" else (lambda: _first_shard_in_progress(out))
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun with --resume" in err
        assert not list(out.glob("*.partial"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) >= (2 if when == "after two shards" else 0)
    with pytest.raises(DatasetError, match="interrupted"):
        BetonDataset(out)

    again = _convert(images, out, "--resume", workers=workers)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert _files(out) == _files(reference)
    done, ref = json.loads((out / "manifest.json").read_text()), json.loads((reference / "manifest.json").read_text())
    for m in (done, ref):
        m.pop("seconds")
    assert done == ref
    assert done["skipped"] == {"empty_file": 1} and done["samples"] == N_IMAGES - 1
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"id": "0007", "reason": "empty_file", "path": str(images / "0007.jpg")}]


def test_resume_refuses_other_settings_and_finished_datasets(images: Path, reference: Path, tmp_path: Path) -> None:
    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import folder

    with pytest.raises(DatasetError, match="already complete"):
        convert(folder.iter_samples(images), reference, source="folder",
                options=ConvertOptions(max_side=96, shard_size=SHARD, workers=1), resume=True, progress=False)  # fmt: skip
    with pytest.raises(DatasetError, match="pass --resume"):
        convert(folder.iter_samples(images), reference, source="folder", progress=False)
    # An interrupted run, resumed with another --max-side, would mix two datasets.
    partial = tmp_path / "partial"
    partial.mkdir()
    for name, data in _files(reference).items():
        if name.startswith(("shard-00000", "shard-00001")):
            (partial / name).write_bytes(data)
    manifest = json.loads((reference / "manifest.json").read_text())
    manifest.update(complete=False, shards=manifest["shards"][:2])
    (partial / "manifest.json").write_text(json.dumps(manifest))
    # The skip log as far as those shards vouch for it: without it, no shard with a skip is trusted.
    (partial / "skipped.jsonl").write_bytes((reference / "skipped.jsonl").read_bytes()[: manifest["shards"][1]["skipped_log_bytes"]])
    with pytest.raises(DatasetError, match="different max_side"):
        convert(folder.iter_samples(images), partial, source="folder",
                options=ConvertOptions(max_side=128, shard_size=SHARD, workers=1), resume=True, progress=False)  # fmt: skip
    # A source that changed since the interruption (here: one record fewer before the cut).
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for p in images.iterdir():
        if not p.name.startswith("0003."):
            (shifted / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DatasetError, match="source changed"):
        convert(folder.iter_samples(shifted), partial, source="folder",
                options=ConvertOptions(max_side=96, shard_size=SHARD, workers=1), resume=True, progress=False)  # fmt: skip
    # A shard damaged after the interruption is converted again, not trusted.
    (partial / "shard-00001.beton").write_bytes(b"\0" * 100)
    convert(folder.iter_samples(images), partial, source="folder",
            options=ConvertOptions(max_side=96, shard_size=SHARD, workers=1), resume=True, progress=False)  # fmt: skip
    assert _files(partial) == _files(reference)
