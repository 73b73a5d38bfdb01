"""What may reach DALI's decoder from an image file: each kind of bad file gets its reason, good ones pass."""
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.image_check import UNREADABLE, check_image, read_image


def _encoded(fmt: str, seed: int = 0, mode: str = "RGB", size=(37, 52)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB")])
def test_good_images_pass(fmt: str, mode: str) -> None:
    assert check_image(_encoded(fmt, mode=mode)) is None


def test_a_camera_trailer_after_the_end_marker_passes() -> None:
    assert check_image(_encoded("JPEG") + np.random.default_rng(1).bytes(300)) is None


def test_each_bad_kind_has_its_reason() -> None:
    rng = np.random.default_rng(2)
    jpeg, png = _encoded("JPEG", seed=3), _encoded("PNG", seed=4)
    sof = jpeg.index(b"\xff\xc0")
    bomb = jpeg[: sof + 5] + struct.pack(">HH", 30000, 30000) + jpeg[sof + 9 :]
    crc_broken = bytearray(png)
    crc_broken[20] ^= 0xFF  # inside IHDR's data: its checksum no longer matches
    cases = {
        b"": "empty_file",
        b"just some notes, not a picture\n" * 10: "not_an_image",
        rng.bytes(2000): "not_an_image",
        jpeg[: len(jpeg) // 2]: "truncated",
        b"\xff\xd8\xff\xd9": "bad_marker",
        bomb: "too_large",
        png[:200]: "truncated",
        bytes(crc_broken): "bad_chunk",
        _encoded("BMP", seed=5)[:100]: "undecodable",
    }
    for data, reason in cases.items():
        assert check_image(data) == reason, (data[:16], reason)


def test_a_file_the_os_will_not_read_is_unreadable(tmp_path: Path, monkeypatch) -> None:
    good = tmp_path / "a.jpg"
    good.write_bytes(_encoded("JPEG"))
    data, reason = read_image(good)
    assert reason is None and bytes(data) == good.read_bytes()
    assert read_image(tmp_path / "gone.jpg") == (None, "missing_file")
    (tmp_path / "dir.jpg").mkdir()
    assert read_image(tmp_path / "dir.jpg") == (None, "unreadable_file")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert read_image(good) == (None, "unreadable_file")


def test_a_bad_checksum_in_an_ancillary_chunk_passes_as_libpng_decodes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    png = _encoded("PNG", seed=6)
    body = b"Comment\0taken on holiday"
    text = struct.pack(">I", len(body)) + b"tEXt" + body + b"\0\0\0\0"  # a CRC that cannot match
    spliced = png[:33] + text + png[33:]  # after the 8-byte signature and the 25-byte IHDR chunk
    assert check_image(spliced) is None
    # The oracle: Pillow, told to be as lenient as libpng is with ancillary chunks, reads every pixel.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(io.BytesIO(spliced)) as image, Image.open(io.BytesIO(png)) as original:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(original.convert("RGB")))
    broken_critical = bytearray(spliced)
    broken_critical[20] ^= 0xFF
    assert check_image(bytes(broken_critical)) == "bad_chunk"


def test_a_fifo_named_like_an_image_is_unreadable_at_once(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "0001.jpg"
    os.mkfifo(fifo)  # opened for reading, it would block until a writer came
    assert read_image(fifo) == (None, UNREADABLE)
