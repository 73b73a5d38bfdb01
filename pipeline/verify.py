"""`slip verify`: decode every sample of a converted dataset and check it against its manifest."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.reader import BetonDataset
from pipeline.schema import read_manifest, sha256_file
from pipeline.skips import SKIP_LOG
from pipeline.text import tokenize


def _check_sample(ds: BetonDataset, i: int, max_side: int) -> str | None:
    """None when sample i is sound, else what is wrong with it."""
    try:
        with Image.open(io.BytesIO(ds.jpeg(i).tobytes())) as image:
            image.load()
            fmt, mode, (w, h) = image.format, image.mode, image.size
    except Exception as err:  # any decoder failure is a broken sample
        return f"image does not decode ({type(err).__name__})"
    if fmt != "JPEG" or mode != "RGB":
        return f"image is {fmt} {mode}, not an RGB JPEG"
    if (h, w) != ds.image_size(i) or max(h, w) > max_side:
        return f"image is {w}x{h}; metadata says {ds.image_size(i)[1]}x{ds.image_size(i)[0]}, max side {max_side}"
    if ds.uid_field(i) != i:
        return f"uid field {ds.uid_field(i)} != index"
    captions, n = ds.captions(i), int(ds.n_captions[i])
    if len(captions) != n or not all(captions):
        return f"{len(captions)} captions in the text field, n_captions says {n}"
    tokens = ds.tokens(i)
    if not np.array_equal(tokens[:n], tokenize(captions)) or tokens[n:].any():
        return "tokens do not match the caption text"
    return None


def verify(directory: str | Path, *, progress: bool = True, max_reports: int = 20) -> tuple[int, list[str]]:
    """(samples checked, problems found); each problem is one line naming the file or sample."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = [
        f"{directory / s['file']}: sha256 does not match the manifest"
        for s in manifest["shards"]
        if sha256_file(directory / s["file"]) != s["sha256"]
    ]
    log, skipped = directory / SKIP_LOG, sum(manifest["skipped"].values())
    if log.is_file():  # datasets converted before the log have none
        with open(log, "rb") as f:
            logged = sum(1 for _ in f)
        if logged != skipped:
            problems.append(f"{log}: names {logged} skipped records; the manifest counts {skipped}")
    ds = BetonDataset(directory)
    ids = ds.ids()
    if len(ids) != len(ds):
        problems.append(f"{directory}: {len(ids)} ids for {len(ds)} samples")
    quiet = not progress or os.environ.get("CI") == "true"
    for i in tqdm(range(len(ds)), desc="verify", unit="img", disable=quiet):
        problem = _check_sample(ds, i, manifest["max_side"])
        if problem is not None:
            problems.append(f"sample {i} ({ids[i] if i < len(ids) else '?'}): {problem}")
    return len(ds), problems[: max_reports] + ([f"... and {len(problems) - max_reports} more"] if len(problems) > max_reports else [])
