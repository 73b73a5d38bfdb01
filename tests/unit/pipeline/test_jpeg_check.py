"""The structural JPEG check the loader runs on every sample before DALI decodes it."""

import cv2
import numpy as np
import pytest

from pipeline.jpeg_check import BAD_MARKER, NO_FRAME, NOT_JPEG, OK, SIZE_MISMATCH, TRUNCATED, check_jpeg


def _jpeg(height: int, width: int, seed: int, **params: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 2)
    flags = [k for kv in params.items() for k in (getattr(cv2, kv[0]), kv[1])]
    ok, data = cv2.imencode(".jpg", image, flags)
    assert ok
    return data.reshape(-1)


def _segment(data: np.ndarray, marker: int) -> int:
    """Byte offset of the first `marker` segment's payload (after its length)."""
    pos = 2
    while data[pos + 1] != marker:
        pos += 2 + ((int(data[pos + 2]) << 8) | int(data[pos + 3]))
    return pos + 4


@pytest.mark.parametrize("params", [{}, {"IMWRITE_JPEG_PROGRESSIVE": 1}, {"IMWRITE_JPEG_RST_INTERVAL": 4}])
def test_well_formed_jpegs_pass(params: dict) -> None:
    for seed, (h, w) in enumerate([(37, 53), (64, 64), (300, 17)]):
        data = _jpeg(h, w, seed, **params)
        assert check_jpeg(data, h, w) == OK
        assert check_jpeg(np.concatenate([data, np.zeros(13, np.uint8)]), h, w) == OK  # FFCV-style zero padding


def test_damage_is_named() -> None:
    data = _jpeg(40, 60, seed=3)
    assert check_jpeg(data, 60, 40) == SIZE_MISMATCH
    assert check_jpeg(data[: len(data) // 2], 40, 60) == TRUNCATED
    assert check_jpeg(data[:-1], 40, 60) == TRUNCATED
    assert check_jpeg(np.zeros(500, np.uint8), 40, 60) == NOT_JPEG
    assert check_jpeg(np.zeros(0, np.uint8), 40, 60) == NOT_JPEG
    assert check_jpeg(np.random.default_rng(0).integers(0, 256, 900, dtype=np.uint8), 40, 60) == NOT_JPEG

    header_noise = data.copy()
    header_noise[2:40] = np.random.default_rng(1).integers(0, 0xFE, 38, dtype=np.uint8)
    assert check_jpeg(header_noise, 40, 60) == BAD_MARKER

    no_frame = data.copy()
    no_frame[_segment(data, 0xC0) - 3] = 0xE5  # the SOF0 marker turned into an APP5 segment
    assert check_jpeg(no_frame, 40, 60) == NO_FRAME

    long_segment = data.copy()
    pos = _segment(data, 0xDB) - 2
    long_segment[pos : pos + 2] = [0xFF, 0xF0]  # a length running past the end
    assert check_jpeg(long_segment, 40, 60) == TRUNCATED
