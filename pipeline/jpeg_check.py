"""A structural check of one stored JPEG, cheap enough to run on every sample the loader reads.

It walks the marker segments up to the first scan: SOI first, well-formed segments, a frame
header whose size matches the shard's metadata, and EOI at the end (trailing zero padding
allowed). Bytes that fail it would make DALI's decoder abort the whole batch; they are the
ones bit rot, a truncated copy or an overwritten shard produce (and evaluation's image files:
`image_check.py`). Damage inside the
entropy-coded data decodes to a visibly wrong image but does not stop DALI, and is left
to `slip verify`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

OK, NOT_JPEG, TRUNCATED, BAD_MARKER, NO_FRAME, SIZE_MISMATCH = range(6)
REASONS = ("ok", "not_jpeg", "truncated", "bad_marker", "no_frame", "size_mismatch")


@njit(cache=True, nogil=True, inline="always")
def _is_frame(marker: int) -> bool:
    # SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC).
    return 0xC0 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC


@njit(cache=True, nogil=True)
def _has_end(buf: np.ndarray, pos: int, n: int) -> bool:
    # In entropy-coded data 0xFF is followed by a stuffed 0x00 or a marker, so the first FF D9
    # after the first scan's header is the end of the image.
    for i in range(pos, n - 1):
        if buf[i] == 0xFF and buf[i + 1] == 0xD9:
            return True
    return False


@njit(cache=True, nogil=True)
def check_jpeg(buf: np.ndarray, height: int, width: int) -> int:
    """One of OK .. SIZE_MISMATCH for uint8 [n] `buf`, expected to be height x width (see `_walk`)."""
    return _walk(buf, height, width)[0]


@njit(cache=True, nogil=True)
def check_jpeg_file(buf: np.ndarray) -> tuple[int, int, int]:
    """(verdict, height, width) for an image file's bytes, whose size nothing records (see `_walk`)."""
    return _walk(buf, -1, -1)


@njit(cache=True, nogil=True)
def _walk(buf: np.ndarray, height: int, width: int) -> tuple[int, int, int]:
    """(verdict, frame height, frame width): one of OK .. SIZE_MISMATCH for uint8 [n] `buf`,
    expected to be height x width, and the frame's size where one was read (else 0, 0).

    A negative height is for an image file, whose size nothing records: any size but an empty
    one passes, and bytes after the end-of-image marker (some cameras append data) are allowed."""
    n = len(buf)
    while n > 0 and buf[n - 1] == 0:
        n -= 1
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return NOT_JPEG, 0, 0
    h = w = np.int64(0)
    stored = height >= 0
    if stored and (buf[n - 2] != 0xFF or buf[n - 1] != 0xD9):
        return TRUNCATED, h, w
    pos = 2
    frame = False
    while pos < n:
        if buf[pos] != 0xFF:
            return BAD_MARKER, h, w
        while pos < n and buf[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return TRUNCATED, h, w
        marker = buf[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn stand alone
            continue
        if marker == 0x00 or marker == 0xD8 or marker == 0xD9:
            return BAD_MARKER, h, w
        if pos + 2 > n:
            return TRUNCATED, h, w
        length = (np.int64(buf[pos]) << 8) | np.int64(buf[pos + 1])
        if length < 2:
            return BAD_MARKER, h, w
        if pos + length > n:
            return TRUNCATED, h, w
        if _is_frame(marker):
            if length < 8:
                return BAD_MARKER, h, w
            h = (np.int64(buf[pos + 3]) << 8) | np.int64(buf[pos + 4])
            w = (np.int64(buf[pos + 5]) << 8) | np.int64(buf[pos + 6])
            if (h != height or w != width) if stored else (h == 0 or w == 0):
                return SIZE_MISMATCH, h, w
            frame = True
        elif marker == 0xDA:  # start of scan: the header is over
            if not frame:
                return NO_FRAME, 0, 0
            return (OK if stored or _has_end(buf, pos + length, n) else TRUNCATED), h, w
        pos += length
    return TRUNCATED, h, w
