"""Whether an image file's bytes may reach DALI's decoder: what evaluation checks before it decodes.

DALI's decoder does not fail cleanly on every bad input: a text file named `.jpg` can kill the
process (a segfault), and a truncated or empty file aborts the whole batch. So the format is
told from the bytes (never from the file name) and the file's structure is checked first:
a JPEG's marker segments (`jpeg_check.py`), a PNG's chunks and their checksums; the formats
DALI also reads but this module does not parse (BMP, TIFF, PNM, JPEG 2000, WebP) are decoded
once by Pillow. Anything else is not an image DALI can read.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.jpeg_check import OK, REASONS, check_jpeg_file
from pipeline.skips import MAX_PIXELS
from pipeline.sources import read_image as read_file

# Reasons, beside jpeg_check's (truncated, bad_marker, ...), in the converter's words where they
# mean the same (`skips.SKIPPED`): a file of no bytes, one the OS will not read or that is not
# there, a header claiming more than MAX_PIXELS; and a file in no format DALI reads, a PNG chunk
# whose checksum or header is wrong, a file Pillow cannot decode.
EMPTY, UNREADABLE, MISSING, TOO_LARGE = "empty_file", "unreadable_file", "missing_file", "too_large"
NOT_AN_IMAGE, BAD_CHUNK, UNDECODABLE = "not_an_image", "bad_chunk", "undecodable"

_PNG = b"\x89PNG\r\n\x1a\n"
_OTHER_MAGIC = (
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000 (JP2 box)
    b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
)


def _is_pnm(data: bytes) -> bool:
    return len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace()


def _is_webp(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def check_png(data: bytes) -> str | None:
    """None for a well-formed PNG (header first, every chunk complete, the critical ones with a
    matching CRC, image data, an end chunk), else the reason."""
    pos, seen_data, first = len(_PNG), False, True
    while True:
        if pos + 8 > len(data):
            return "truncated"
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            return "truncated"
        body = data[pos + 8 : pos + 8 + length]
        # A bad CRC in an ancillary chunk (lower-case first letter: text, pHYs, ...) only draws a
        # warning from libpng, and the image decodes; in a critical one the image is damaged.
        if kind[:1].isupper() and zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4 : end])[0]:
            return BAD_CHUNK
        if first:
            if kind != b"IHDR" or length != 13 or 0 in struct.unpack(">II", body[:8]):
                return BAD_CHUNK
            width, height = struct.unpack(">II", body[:8])
            if width * height > MAX_PIXELS:
                return TOO_LARGE
        first = False
        seen_data |= kind == b"IDAT"
        if kind == b"IEND":
            return None if seen_data else BAD_CHUNK
        pos = end


def _pillow_check(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return TOO_LARGE
            image.load()
    except Exception:  # noqa: BLE001 - whatever Pillow raises, DALI must not see these bytes
        return UNDECODABLE
    return None


def check_image(data: bytes | np.ndarray) -> str | None:
    """None when the encoded image may be decoded, else why not (a short reason name)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    if len(buf) == 0:
        return EMPTY
    head = bytes(buf[:16])
    if head[:3] == b"\xff\xd8\xff":
        verdict, height, width = check_jpeg_file(buf)
        if verdict != OK:
            return REASONS[verdict]
        return TOO_LARGE if height * width > MAX_PIXELS else None
    if head[:8] == _PNG:
        return check_png(bytes(buf))
    if any(head.startswith(m) for m in _OTHER_MAGIC) or _is_pnm(head) or _is_webp(head):
        return _pillow_check(bytes(buf))
    return NOT_AN_IMAGE


def read_image(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(uint8 bytes, None) for a file that passes `check_image`, else (None, the reason). The bytes
    are read as the converter reads an image file (`sources.read_image`): a file over
    MAX_FILE_BYTES or one that is not a regular file (a FIFO would never end) is not read at all."""
    try:
        data = read_file(str(path))
    except FileNotFoundError:  # a broken link, a file removed since the folder was listed
        return None, MISSING
    except OSError:  # no permission, a directory or FIFO with an image's name, too large, an I/O error: this file only
        return None, UNREADABLE
    reason = check_image(data)
    return (np.frombuffer(data, dtype=np.uint8), None) if reason is None else (None, reason)
