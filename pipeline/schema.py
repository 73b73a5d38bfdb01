"""Schema v1 of a converted dataset: the FFCV fields of each shard and the manifest beside them.

A converted dataset is a directory: `shard-00000.beton ...` written by FFCV's DatasetWriter
and `manifest.json`. Every shard is readable by FFCV's own Loader: that is the contract.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ffcv_compat import IMAGE_MODES, BytesField, IntField, NDArrayField, RGBImageField
from pipeline.images import EncodedImage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FIELD_NAMES = ("image", "tokens", "n_captions", "uid", "text")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.beton"


# Read once here: IMAGE_MODES is a numba typed dict whose first lookup compiles, and a
# compile inside a forked writer worker is one more thing that can go wrong there.
JPG_MODE = int(IMAGE_MODES["jpg"])


def _passthrough_encode(destination: np.ndarray, image: EncodedImage, malloc: Callable) -> None:
    """Store an already-normalised JPEG as FFCV's jpg mode stores its own encodings."""
    destination["mode"] = JPG_MODE
    destination["height"], destination["width"] = image.height, image.width
    destination["data_ptr"], storage = malloc(image.jpeg.nbytes)
    storage[:] = image.jpeg


def ffcv_fields(captions_per_image: int, context_length: int, max_side: int) -> dict[str, Any]:
    image = RGBImageField(write_mode="jpg", max_resolution=max_side)
    # FFCV identifies a field by its exact class, so a subclass would make the file unreadable
    # by stock FFCV; the instance keeps the class and skips FFCV's decode/re-encode instead.
    image.encode = _passthrough_encode
    return {
        "image": image,
        "tokens": NDArrayField(np.dtype("int32"), (captions_per_image, context_length)),
        "n_captions": IntField(),
        "uid": IntField(),
        "text": BytesField(),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DatasetError(ValueError):
    """A converted dataset that cannot be used; the message names the file."""


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DatasetError(f"{directory}: no such dataset directory")
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest; is this a directory written by `slip convert`?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DatasetError(f"{path}: not valid JSON") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{path}: schema_version {version!r}, this slipstream reads {SCHEMA_VERSION}")
    for key in ("complete", "samples", "shards", "captions_per_image", "context_length"):
        if key not in manifest:
            raise DatasetError(f"{path}: missing key '{key}'")
    if not manifest["complete"]:
        raise DatasetError(f"{path}: the conversion was interrupted; finish it with `slip convert ... --resume`")
    return manifest
