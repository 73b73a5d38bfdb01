"""Image normalisation at conversion time: whatever comes in, a bounded RGB JPEG comes out.

A sample that cannot be normalised raises BadSample with a short reason, which the
converter counts in the manifest; it never reaches FFCV's writer (a writer worker that
raises makes FFCV's parent process hang).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 1 << 26  # 67 Mpx: past this a header is treated as a decompression bomb
MIN_SIDE = 8  # smaller images carry nothing a 224 px crop can use


class BadSample(ValueError):
    """A sample the converter skips; `reason` is the manifest's counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class EncodedImage:
    jpeg: np.ndarray  # uint8 [n_bytes], a baseline RGB JPEG
    height: int
    width: int


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadSample("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise BadSample("too_large", f"{image.width}x{image.height}")
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("too_large") from None
    except Exception as err:  # PIL raises many types for broken files; all mean "undecodable"
        raise BadSample("undecodable", type(err).__name__) from None
    return image


def _keep_bytes(image: Image.Image, data: bytes, max_side: int) -> bool:
    """An RGB JPEG already small enough and upright is stored byte for byte."""
    orientation = image.getexif().get(0x0112, 1)
    return image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= max_side and orientation == 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white so transparent regions don't turn into arbitrary colours.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting PIL clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = max(float(array.max()), 1.0)
        return Image.fromarray((array * (255.0 / peak)).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def normalize_image(data: bytes, *, max_side: int, quality: int) -> EncodedImage:
    image = _open(data)
    if min(image.size) < MIN_SIDE:
        raise BadSample("too_small", f"{image.width}x{image.height}")
    if _keep_bytes(image, data, max_side):
        return EncodedImage(np.frombuffer(data, dtype=np.uint8), image.height, image.width)
    image = _to_rgb(ImageOps.exif_transpose(image))
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return EncodedImage(np.frombuffer(out.getvalue(), dtype=np.uint8), image.height, image.width)
