"""A new user's first hour on real-looking photographs with bad files among them, through the
`slip` command in fresh processes: convert, verify, train, export and the three evaluations.

Every command either exits 0 and counts what it skipped, or exits non-zero with exactly one
line on stderr; never a traceback, never a signal. The oracle for the evaluations is the same
tree without its bad files: skipping must leave the figures (and so the labels) exactly as they
are on the clean tree.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "coffee_mug", "golden retriever")  # folder names are the class names
PER_CLASS = 10


def _photo(rng: np.random.Generator, hue: int) -> Image.Image:
    """A photo-like image: smooth light and texture with sensor noise, tinted per class."""
    h, w = (int(v) for v in rng.integers(72, 160, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(4, 30)), np.cos(yy / rng.uniform(4, 30)), np.sin((xx + yy) / 25)], -1)
    tint = np.roll(np.array([60.0, 0.0, -40.0]), hue)
    pixels = (120 + tint + 70 * base + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)  # (h, w, 3)
    return Image.fromarray(pixels)


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _bomb(rng: np.random.Generator) -> bytes:
    data = bytearray(_jpeg(_photo(rng, 0)))
    sof = data.index(b"\xff\xc0")  # marker, length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    return bytes(data)


def _bad_files(rng: np.random.Generator) -> dict[str, bytes | None]:
    """Twelve kinds of file that no decoder should be handed; None: a directory with an image's name."""
    photo = _jpeg(_photo(rng, 1))
    return {
        "empty.jpg": b"",
        "notes.jpg": b"these are my holiday notes, not a picture\n" * 20,
        "saved_page.jpg": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n",
        "truncated.jpg": photo[: len(photo) // 2],
        "no_start_marker.jpg": b"\0\0\0\0" + photo[4:],
        "header_only.jpg": b"\xff\xd8\xff\xd9",
        "noise.png": rng.bytes(4000),
        "truncated.png": _png(_photo(rng, 2))[:300],
        "bomb.jpg": _bomb(rng),
        "tail_only.jpg": photo[len(photo) // 2 :],
        "broken_link.jpg": b"",  # replaced by a symlink to nowhere
        "a_folder.jpg": None,
    }


def _write_tree(root: Path, seed: int, bad: bool) -> int:
    """The class-per-folder tree with sidecar captions; returns the number of bad entries written."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            (folder / f"{i:03d}.jpg").write_bytes(_jpeg(_photo(rng, c)))
            (folder / f"{i:03d}.txt").write_text(f"a photo of a {name}, picture {i}\n")
        # Odd but good: each must be kept (a PNG named .jpg, CMYK, a caption with invalid UTF-8).
        (folder / "really_a_png.jpg").write_bytes(_png(_photo(rng, c)))
        (folder / "really_a_png.txt").write_text(f"a {name} saved as PNG\n")
        (folder / "cmyk.jpg").write_bytes(_jpeg(_photo(rng, c).convert("CMYK")))
        (folder / "cmyk.txt").write_text(f"a {name} printed in CMYK\n")
        (folder / "latin1.jpg").write_bytes(_jpeg(_photo(rng, c)))
        (folder / "latin1.txt").write_bytes(f"a {name} in the caf\xe9\n".encode("latin-1"))
    if not bad:
        return 0
    rng = np.random.default_rng(seed + 1)
    files = _bad_files(rng)
    for k, (name, data) in enumerate(files.items()):
        path = root / CLASSES[k % len(CLASSES)] / name
        if data is None:
            path.mkdir()
        elif name == "broken_link.jpg":
            path.symlink_to(root / "nowhere.jpg")
        else:
            path.write_bytes(data)
    return len(files)


def _slip(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    env.pop("SLIP_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "slip", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode >= 0, f"slip {' '.join(args)} died of signal {-proc.returncode}:\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, f"slip {' '.join(args)}:\n{proc.stderr[-3000:]}"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, f"slip {' '.join(args)} exited {proc.returncode} with {len(lines)} lines:\n{proc.stderr[-3000:]}"
    return proc


def _ok(*args: str, tmp: Path) -> dict | None:
    proc = _slip(*args, tmp=tmp)
    assert proc.returncode == 0, f"slip {' '.join(args)}: {proc.stderr.strip()[-2000:]}"
    return json.loads(proc.stdout) if "--json" in args else None


def _skipped(result: dict) -> int:
    counts = result["skipped"]
    return sum(counts.values()) if isinstance(counts, dict) else int(counts)


def _clobber_one_sample(beton: Path, index: int) -> None:
    """Zero the JPEG start marker of one stored sample, in place (as a bad disk or copy would)."""
    from pipeline.reader import BetonDataset

    shard, i = BetonDataset(beton)._locate(index)
    with open(beton / shard.path.name, "r+b") as f:
        f.seek(int(shard.image_ptr[i]))
        f.write(b"\0\0\0\0")


@pytest.mark.slow
def test_bad_files_from_conversion_to_every_evaluation(tmp_path: Path) -> None:
    photos, clean = tmp_path / "photos", tmp_path / "clean"
    n_bad = _write_tree(photos, seed=0, bad=True)
    _write_tree(clean, seed=0, bad=False)
    n_good = len(CLASSES) * (PER_CLASS + 3)

    # Conversion keeps every good file and counts every bad one, by reason, naming them.
    beton = tmp_path / "beton"
    _ok("convert", "folder", "--images", str(photos), "--out", str(beton), "--max-side", "96", "--workers", "1", tmp=tmp_path)
    manifest = json.loads((beton / "manifest.json").read_text())
    assert manifest["samples"] == n_good, manifest
    assert sum(manifest["skipped"].values()) == n_bad, manifest["skipped"]
    inspected = _slip("inspect", str(beton), tmp=tmp_path).stdout
    assert "no_start_marker" in inspected and "notes" in inspected  # skipped samples are named
    _ok("verify", str(beton), tmp=tmp_path)
    labelled = tmp_path / "labelled"
    _ok("convert", "classes", "--images", str(photos), "--out", str(labelled), "--max-side", "96", "--workers", "1", tmp=tmp_path)

    # A sample damaged after conversion: verify names it; training replaces it; retrieval skips it.
    damaged = tmp_path / "damaged"
    shutil.copytree(beton, damaged)
    _clobber_one_sample(damaged, 5)
    verdict = _slip("verify", str(damaged), tmp=tmp_path)
    assert verdict.returncode != 0 and any(line.startswith("sample 5 ") for line in verdict.stdout.splitlines())
    runs = tmp_path / "runs"
    _ok("train", "--config", "tiny_cpu", f"data.train={damaged}", f"run.out={runs}", "run.name=first_hour",
        "schedule.steps=3", "data.batch_size=16", "run.tensorboard=false", "run.log_every=1", tmp=tmp_path)  # fmt: skip
    records = [json.loads(line) for line in (runs / "first_hour" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["replaced_samples"] >= 1
    model = tmp_path / "model.safetensors"
    _ok("export", str(runs / "first_hour"), "--out", str(model), tmp=tmp_path)

    # Evaluations: the bad files are skipped and counted; the figures are the clean tree's.
    small = ["--batch-size", "8", "--threads", "2", "--json"]
    for data in (photos, labelled):
        dirty = _ok("eval", "zeroshot", "--checkpoint", str(model), "--data", str(data), *small, tmp=tmp_path)
        reference = _ok("eval", "zeroshot", "--checkpoint", str(model), "--data", str(clean), *small, tmp=tmp_path)
        assert (dirty["top1"], dirty["top5"], dirty["images"]) == (reference["top1"], reference["top5"], reference["images"])
        assert _skipped(dirty) == (n_bad if data == photos else 0), dirty
    dirty = _ok("eval", "linear", "--checkpoint", str(runs / "first_hour"), "--train", str(photos), "--val", str(photos),
                "--l2", "1e-4,1e-2", *small, tmp=tmp_path)  # fmt: skip
    reference = _ok("eval", "linear", "--checkpoint", str(runs / "first_hour"), "--train", str(clean), "--val", str(clean),
                    "--l2", "1e-4,1e-2", *small, tmp=tmp_path)  # fmt: skip
    assert (dirty["top1"], dirty["n_train"], dirty["n_val"]) == (reference["top1"], reference["n_train"], reference["n_val"])
    assert _skipped(dirty) == 2 * n_bad, dirty
    retrieval = _ok("eval", "retrieval", "--checkpoint", str(model), "--data", str(damaged), *small, tmp=tmp_path)
    assert retrieval["images"] == n_good - 1 and _skipped(retrieval) == 1, retrieval

    # Nothing is left behind in the temporary directory the commands were given.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("tmp", "__autograph"))]
