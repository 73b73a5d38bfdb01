"""Image normalisation at conversion time: whatever comes in, a bounded RGB JPEG comes out.

Normalised (the sample is kept):
- an RGB JPEG that is already within max_side, upright (EXIF orientation absent or 1) and
  ends with its EOI marker is stored byte for byte; anything else is decoded, normalised
  as below and re-encoded as a baseline JPEG at `quality`, without metadata;
- EXIF orientation is applied, so the stored pixels are upright (orientations 5-8 swap
  width and height);
- transparency (RGBA, LA, PA, a palette's transparent index, an RGB or L colour key) is
  composited on white;
- 16-bit greyscale (I;16*; 32-bit I is read as 16-bit data) keeps its high byte, so 32768
  becomes 128 instead of clipping to 255; float (F) is read as 0..1 when every value lies
  at or below 1, else as 0..255 (clipped; NaN is 0);
- CMYK, CIELab, YCbCr, HSV, greyscale, bilevel and palette images are converted to RGB
  by PIL (embedded ICC profiles are not applied);
- a longest side above max_side is resized to max_side (area averaging, aspect ratio kept);
- of an animated or multi-page file (GIF, APNG, TIFF) only the first frame is kept.

Skipped, raising BadSample with the manifest's counter key (pipeline/skips.py defines them all):
- empty_file: zero bytes;
- too_large: the header claims more than MAX_PIXELS pixels (a decompression bomb). Checked
  from the header, before any pixel is decoded, whatever PIL.Image.MAX_IMAGE_PIXELS says
  (None included); a caller that lowered PIL's limit below ours gets that one too;
- too_small: the shorter side is below MIN_SIDE (a 1 x 1 tracking pixel);
- undecodable: bytes PIL cannot identify (random bytes), cannot decode to the end (a
  truncated file), or cannot convert.

A skipped sample never reaches FFCV's writer (a writer worker that raises makes FFCV's
parent process hang), and nothing here raises anything but BadSample for bad bytes.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from pipeline.skips import MAX_PIXELS, MIN_SIDE

# Conversion runs one process per core; OpenCV's own thread pool would only oversubscribe them.
cv2.setNumThreads(1)

__all__ = ["MAX_PIXELS", "MIN_SIDE", "BadSample", "EncodedImage", "normalize_image"]


class BadSample(ValueError):
    """A sample the converter skips; `reason` is the manifest's counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class EncodedImage:
    jpeg: np.ndarray  # uint8 [n_bytes], an RGB JPEG
    height: int
    width: int


def _open(data: bytes, decode: bool = True) -> Image.Image:
    """Identify, bound-check from the header, then decode (unless told not to); BadSample on any failure."""
    if not data:
        raise BadSample("empty_file")
    with warnings.catch_warnings():
        # PIL's own check (in Image.open and GIF frame seeks) reads its global limit, which
        # callers may raise or disable; it can only add to ours, below, never replace it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > MAX_PIXELS:
                raise BadSample("too_large", f"{width}x{height}")
            if min(width, height) < MIN_SIDE:
                raise BadSample("too_small", f"{width}x{height}")
            if decode:
                image.load()
        except BadSample:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadSample("too_large") from None
        except Exception as err:  # PIL raises many types for broken files; all mean "undecodable"
            raise BadSample("undecodable", type(err).__name__) from None
    return image


def _complete_jpeg(data: bytes) -> bool:
    """Ends with the EOI marker, allowing the zero padding some writers add after it."""
    return data.rstrip(b"\0").endswith(b"\xff\xd9")


def _keep_bytes(image: Image.Image, data: bytes, max_side: int) -> bool:
    """An RGB JPEG already small enough, upright and complete is stored byte for byte.

    The EOI check keeps a truncated JPEG out even if a caller set PIL's
    ImageFile.LOAD_TRUNCATED_IMAGES (PIL then decodes it, grey-filled, and it is re-encoded).
    """
    orientation = image.getexif().get(0x0112, 1)
    return (
        image.format == "JPEG"
        and image.mode == "RGB"
        and max(image.size) <= max_side
        and orientation == 1
        and _complete_jpeg(data)
    )


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """I;16*, I and F -> L by value range, not by PIL's clipping at 255."""
    array = np.asarray(image)  # (h, w)
    if image.mode == "F":
        array = np.nan_to_num(array.astype(np.float32), nan=0.0)
        if array.size and float(array.max()) <= 1.0:
            array = array * 255.0
        return Image.fromarray(array.clip(0, 255).round().astype(np.uint8))
    return Image.fromarray((array.clip(0, 65535) >> 8).astype(np.uint8))  # the high byte of 16-bit data


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "F" or image.mode.startswith("I"):
        image = _to_8bit_grey(image)  # a 16-bit colour key, if any, is dropped with the low byte
    if image.has_transparency_data:
        # Composite on white so transparent regions don't turn into arbitrary colours.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _decode_plain_jpeg(data: bytes) -> np.ndarray | None:
    """BGR pixels of a complete colour or greyscale JPEG, upright, via OpenCV; None for any other file.

    The common case of a web dataset, decoded about 1.4x faster than by PIL. OpenCV applies
    the EXIF orientation itself; a file without its end marker goes to PIL, which refuses it.
    """
    if not _complete_jpeg(data):
        return None
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)  # (h, w, 3) BGR


def _decode(data: bytes, max_side: int) -> tuple[np.ndarray | None, Image.Image]:
    """(upright BGR pixels, or None when the bytes are kept as they are; the PIL header).

    BGR, contiguous, because that is what OpenCV resizes and encodes without a copy."""
    header = _open(data, decode=False)
    if header.format == "JPEG" and header.mode in ("RGB", "L"):
        pixels = _decode_plain_jpeg(data)
        if pixels is not None:
            return (None if _keep_bytes(header, data, max_side) else pixels), header
    image = _open(data)
    if _keep_bytes(image, data, max_side):
        return None, image
    ImageOps.exif_transpose(image, in_place=True)
    return cv2.cvtColor(np.asarray(_to_rgb(image)), cv2.COLOR_RGB2BGR), image  # (h, w, 3) BGR


def normalize_image(data: bytes, *, max_side: int, quality: int) -> EncodedImage:
    """Encoded bytes of any PIL-readable format -> an upright RGB JPEG, longest side <= max_side."""
    try:
        pixels, header = _decode(data, max_side)
        if pixels is None:
            return EncodedImage(np.frombuffer(data, dtype=np.uint8), header.height, header.width)
        height, width = pixels.shape[:2]
        if max(height, width) > max_side:
            scale = max_side / max(height, width)
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
            # Area averaging: antialiased like PIL's Lanczos for a downscale, several times faster.
            pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
    except BadSample:
        raise
    except Exception as err:  # unreadable EXIF, a mode PIL cannot convert: skip the sample, not the run
        raise BadSample("undecodable", type(err).__name__) from None
    return EncodedImage(jpeg.reshape(-1), height, width)
