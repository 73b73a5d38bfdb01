"""Bad input, built here: each image or caption is either normalised or skipped and counted by reason.

Every case of the issue's list is made in tmp_path by the test itself: a folder with sidecar
captions (as the `folder` source reads it), plus Samples and Skips fed to the converter
directly. The converter must finish, count each skip by reason, and store the normalised
ones as upright RGB JPEGs no larger than max_side.
"""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.convert import ConvertOptions, convert
from pipeline.images import MAX_PIXELS, BadSample, normalize_image
from pipeline.reader import BetonDataset
from pipeline.sources import Sample, Skip, folder

MAX_SIDE = 64
OPTS = ConvertOptions(max_side=MAX_SIDE, captions_per_image=3, workers=1)
RED, WHITE, BLACK = (200, 30, 30), (255, 255, 255), (0, 0, 0)
START, END = 49406, 49407  # CLIP's start and end tokens


# --- building bad input ------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _rgb_jpeg(size=(48, 40), seed=0) -> bytes:
    # A smooth colour field, so JPEG leaves the pixels near where they were.
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    a, b = np.random.default_rng(seed).uniform(60, 200, 2)
    pixels = np.stack([a * xx + 40, b * yy + 20, 120 * (1 - xx) + 10], axis=-1).clip(0, 255).astype(np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=92)


def _halves(mode: str, left, right, size=(48, 32)) -> Image.Image:
    """Left half `left`, right half `right`: flat regions that survive JPEG."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _exif_rotated_jpeg(size=(48, 24)) -> bytes:
    """Stored landscape with a red top-left block, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    image = Image.new("RGB", size, (30, 60, 200))
    image.paste(RED, (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", quality=95, exif=exif)


def _alpha_png() -> bytes:
    return _encode(_halves("RGBA", (0, 0, 0, 0), RED + (255,)), "PNG")  # left half fully transparent


def _palette(transparent: bool, fmt: str = "GIF") -> bytes:
    image = _halves("P", 0, 1)
    image.putpalette([10, 20, 30, *RED] + [0] * (256 - 2) * 3)
    return _encode(image, fmt, **({"transparency": 0} if transparent else {}))  # index 0: the left half


def _cmyk_jpeg() -> bytes:
    return _encode(_halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), "JPEG", quality=95)  # red | black


def _deep_png() -> bytes:
    """16-bit greyscale: mid grey 32768 on the left, quarter grey 16384 on the right (nothing at 65535)."""
    pixels = np.full((32, 48), 32768, dtype=np.uint16)
    pixels[:, 24:] = 16384
    data = _encode(Image.fromarray(pixels), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb_png(width=30000, height=30000) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (and far too short) IDAT.

    If the size check ran after decoding, PIL would first allocate the pixels and then fail
    on the short IDAT: the reason would be `undecodable`, not `too_large`.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _bomb_jpeg(width=30000, height=30000) -> bytes:
    """A small valid JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = _rgb_jpeg((400, 300), seed=5)
    return data[: len(data) // 2]


def _random_bytes(seed=0) -> bytes:
    return np.random.default_rng(seed).bytes(3000)


def _decode(jpeg) -> Image.Image:
    image = Image.open(io.BytesIO(bytes(jpeg)))
    image.load()
    return image


def _close(pixel, expected, tol=12) -> bool:
    return all(abs(int(p) - int(e)) <= tol for p, e in zip(pixel, expected))


# --- normalize_image, one kind at a time --------------------------------------------------


def _normalised(data: bytes) -> Image.Image:
    encoded = normalize_image(data, max_side=MAX_SIDE, quality=90)
    image = _decode(encoded.jpeg)
    assert image.format == "JPEG" and image.mode == "RGB"
    assert (image.height, image.width) == (encoded.height, encoded.width)
    assert max(image.size) <= MAX_SIDE
    return image


def _check_alpha(image):  # transparent black -> white, opaque red stays red
    assert _close(image.getpixel((4, 16)), WHITE) and _close(image.getpixel((44, 16)), RED)


def _check_palette(image):
    assert _close(image.getpixel((4, 16)), (10, 20, 30)) and _close(image.getpixel((44, 16)), RED)


def _check_palette_transparent(image):  # the transparent index becomes white
    assert _close(image.getpixel((4, 16)), WHITE) and _close(image.getpixel((44, 16)), RED)


def _check_cmyk(image):  # C=0 M=Y=255 is red; K=255 is black
    assert _close(image.getpixel((4, 16)), (255, 0, 0), tol=16) and _close(image.getpixel((44, 16)), BLACK)


def _check_deep(image):  # the full 16-bit range maps to 8 bits: not clipped at 255, not stretched to the peak
    assert _close(image.getpixel((4, 16)), (128, 128, 128), tol=2)
    assert _close(image.getpixel((44, 16)), (64, 64, 64), tol=2)


def _check_grey(image):
    r, g, b = image.getpixel((4, 16))
    assert r == g == b and abs(r - 90) <= 3
    assert _close(image.getpixel((44, 16)), (200, 200, 200), tol=3)


def _check_grey_alpha(image):  # LA: transparent -> white, opaque grey stays grey
    assert _close(image.getpixel((4, 16)), WHITE) and _close(image.getpixel((44, 16)), (90, 90, 90))


def _check_bilevel(image):
    assert _close(image.getpixel((4, 16)), BLACK) and _close(image.getpixel((44, 16)), WHITE)


def _check_rotated(image):
    assert image.size == (24, 48)  # stored 48 x 24, displayed portrait
    assert _close(image.getpixel((24 - 3, 2)), RED, tol=20)  # the stored top-left is now top-right
    assert _close(image.getpixel((2, 2)), (30, 60, 200), tol=20)


IMAGE_KINDS = {
    "rgba_png": (_alpha_png, _check_alpha),
    "la_png": (lambda: _encode(_halves("LA", (0, 0), (90, 255)), "PNG"), _check_grey_alpha),
    "palette_gif": (lambda: _palette(False), _check_palette),
    "palette_gif_transparent": (lambda: _palette(True), _check_palette_transparent),
    "palette_png_transparent": (lambda: _palette(True, "PNG"), _check_palette_transparent),
    "rgb_png_colour_key": (lambda: _encode(_halves("RGB", BLACK, RED), "PNG", transparency=BLACK), _check_alpha),
    "cmyk_jpeg": (_cmyk_jpeg, _check_cmyk),
    "16bit_png": (_deep_png, _check_deep),
    "32bit_int_tiff": (lambda: _encode(_halves("I", 32768, 16384), "TIFF"), _check_deep),  # read as 16-bit data
    "float_tiff": (lambda: _encode(_halves("F", 0.5, 0.25), "TIFF"), _check_deep),
    "grey_png": (lambda: _encode(_halves("L", 90, 200), "PNG"), _check_grey),
    "grey_jpeg": (lambda: _encode(_halves("L", 90, 200), "JPEG", quality=95), _check_grey),
    "bilevel_png": (lambda: _encode(_halves("1", 0, 1), "PNG"), _check_bilevel),
    "exif_rotated_jpeg": (_exif_rotated_jpeg, _check_rotated),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_each_image_kind_is_normalised_to_rgb(kind: str) -> None:
    build, check = IMAGE_KINDS[kind]
    image = _normalised(build())
    check(image)
    assert "exif" not in image.info  # re-encoded without metadata, so nothing rotates it twice


SKIPPED_KINDS = {
    "zero_byte": (lambda: b"", "empty_file"),
    "truncated_jpeg": (_truncated_jpeg, "undecodable"),
    "random_bytes": (_random_bytes, "undecodable"),
    "png_bomb_30000": (_bomb_png, "too_large"),
    "jpeg_bomb_30000": (_bomb_jpeg, "too_large"),
    "one_by_one": (lambda: _encode(Image.new("RGB", (1, 1), RED), "PNG"), "too_small"),
    "one_by_one_jpeg": (lambda: _encode(Image.new("RGB", (1, 1), RED), "JPEG"), "too_small"),
}


@pytest.mark.parametrize("kind", sorted(SKIPPED_KINDS))
def test_each_bad_image_is_skipped_by_reason(kind: str) -> None:
    build, reason = SKIPPED_KINDS[kind]
    with pytest.raises(BadSample) as err:
        normalize_image(build(), max_side=MAX_SIDE, quality=90)
    assert err.value.reason == reason


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_undecodable(seed: int) -> None:
    with pytest.raises(BadSample, match="undecodable"):
        normalize_image(_random_bytes(seed), max_side=MAX_SIDE, quality=90)


@pytest.mark.parametrize("pil_limit", ["default", None, 1 << 40])
@pytest.mark.parametrize("bomb", [_bomb_png, _bomb_jpeg])
def test_decompression_bombs_are_refused_whatever_pils_global_limit(monkeypatch, bomb, pil_limit) -> None:
    if pil_limit != "default":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    for width, height in [(30000, 30000), (9000, 8000)]:  # 9000 x 8000: over our limit, under PIL's default
        assert width * height > MAX_PIXELS
        with pytest.raises(BadSample) as err:
            normalize_image(bomb(width, height), max_side=MAX_SIDE, quality=90)
        assert err.value.reason == "too_large", str(err.value)


def test_a_lowered_pil_limit_is_honoured_too(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSample, match="too_large"):
        normalize_image(_rgb_jpeg(), max_side=MAX_SIDE, quality=90)


def test_a_small_upright_rgb_jpeg_is_kept_byte_for_byte() -> None:
    data = _rgb_jpeg((48, 40))
    encoded = normalize_image(data, max_side=MAX_SIDE, quality=90)
    assert encoded.jpeg.tobytes() == data and (encoded.height, encoded.width) == (40, 48)


def test_an_rgb_jpeg_with_exif_orientation_is_re_encoded() -> None:
    data = _exif_rotated_jpeg()
    assert max(Image.open(io.BytesIO(data)).size) <= MAX_SIDE and Image.open(io.BytesIO(data)).mode == "RGB"
    encoded = normalize_image(data, max_side=MAX_SIDE, quality=90)
    assert encoded.jpeg.tobytes() != data
    assert (encoded.width, encoded.height) == (24, 48)


def test_a_large_jpeg_is_resized_and_rotated() -> None:
    image = Image.new("RGB", (400, 200), (30, 60, 200))
    image.paste(RED, (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = _normalised(_encode(image, "JPEG", exif=exif))
    assert out.size == (32, 64)
    assert _close(out.getpixel((29, 2)), RED, tol=20) and _close(out.getpixel((2, 2)), (30, 60, 200), tol=20)


def test_a_truncated_jpeg_is_never_kept_even_when_pil_loads_truncated_images(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # long scan data
    data = _encode(Image.fromarray(noise), "JPEG", quality=95)
    assert normalize_image(data, max_side=MAX_SIDE, quality=90).jpeg.tobytes() == data  # kept when whole
    truncated = data[: len(data) // 2]  # inside the scan data, past the tables
    encoded = normalize_image(truncated, max_side=MAX_SIDE, quality=90)  # PIL grey-fills the rest
    assert encoded.jpeg.tobytes() != truncated
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    _decode(encoded.jpeg)  # a complete JPEG, decodable without the lenient flag


# --- the converter over all of it at once --------------------------------------------------

LONG_CAPTION = " ".join(f"word{i % 50} and" for i in range(150))  # 300 words, far over 77 tokens
NON_UTF8 = b"caf\xe9 \xff\xfe cr\xc3\xa8me\n"  # latin-1 e-acute, two invalid bytes, then valid UTF-8


def _build_folder(root: Path) -> dict[str, bytes]:
    """Write every bad image with a sidecar caption; return each sample's image bytes by uid."""
    images = {
        "alpha.png": _alpha_png(),
        "palette.gif": _palette(False),
        "palette_transparent.gif": _palette(True),
        "cmyk.jpg": _cmyk_jpeg(),
        "deep.png": _deep_png(),
        "grey.png": _encode(_halves("L", 90, 200), "PNG"),
        "grey_jpeg.jpg": _encode(_halves("L", 90, 200), "JPEG", quality=95),
        "rotated.jpg": _exif_rotated_jpeg(),
        "kept.jpg": _rgb_jpeg((48, 40), seed=2),
        "big.jpg": _rgb_jpeg((200, 100), seed=3),
        "bomb.png": _bomb_png(),
        "bomb_jpeg.jpg": _bomb_jpeg(),
        "pixel.png": _encode(Image.new("RGB", (1, 1), RED), "PNG"),
        "truncated.jpg": _truncated_jpeg(),
        "random.jpg": _random_bytes(),
        "zero.jpg": b"",
        "latin1.jpg": _rgb_jpeg(seed=4),
        "empty_caption.jpg": _rgb_jpeg(seed=5),
        "blank_caption.jpg": _rgb_jpeg(seed=6),
        "long_caption.jpg": _rgb_jpeg(seed=7),
        "twin.jpg": _rgb_jpeg(seed=8),  # twin.jpg and twin.png share the folder uid "twin"
        "twin.png": _encode(Image.new("RGB", (40, 40), RED), "PNG"),
    }
    root.mkdir()
    for name, data in images.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"a picture called {Path(name).stem}\n")
    (root / "latin1.txt").write_bytes(NON_UTF8)
    (root / "empty_caption.txt").write_bytes(b"")
    (root / "blank_caption.txt").write_bytes(b"   \t \n \n\t\n")
    (root / "long_caption.txt").write_text(LONG_CAPTION + "\n")
    return {Path(name).stem: data for name, data in sorted(images.items(), reverse=True)}  # twin -> twin.jpg


EXPECTED_SKIPS = {
    "empty_file": 1,  # zero.jpg
    "undecodable": 2,  # truncated.jpg, random.jpg
    "too_large": 2,  # bomb.png, bomb_jpeg.jpg
    "too_small": 1,  # pixel.png
    "no_caption": 2,  # empty_caption, blank_caption
    "missing_file": 1,
    "malformed_annotation": 1,
    "duplicate_id": 2,  # twin.png after twin.jpg; the second "kept"
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    by_uid = _build_folder(tmp / "imgs")
    samples = list(folder.iter_samples(tmp / "imgs"))
    samples += [
        Sample("missing", str(tmp / "imgs" / "not-there.jpg"), ["a caption for nothing"]),
        Skip("annotations.jsonl:7", "malformed_annotation"),
        Sample("kept", _rgb_jpeg(seed=9), ["the same id again"]),  # a duplicate id from another record
    ]
    manifest = convert(samples, tmp / "out", source="bad-input", options=OPTS, progress=False)
    ds = BetonDataset(tmp / "out")
    ids = manifest["ids"] if "ids" in manifest else ds.ids()
    index = {}
    for i, uid in enumerate(ids):
        index.setdefault(uid, i)
    return manifest, ds, index, by_uid


NORMALISED = ["alpha", "big", "cmyk", "deep", "grey", "grey_jpeg", "kept", "latin1", "long_caption",
              "palette", "palette_transparent", "rotated", "twin"]  # fmt: skip


def test_conversion_completes_and_counts_every_skip_by_reason(converted) -> None:
    manifest, ds, index, _ = converted
    assert sorted(index) == NORMALISED
    without_duplicates = {k: v for k, v in manifest["skipped"].items() if k != "duplicate_id"}
    assert without_duplicates == {k: v for k, v in EXPECTED_SKIPS.items() if k != "duplicate_id"}
    assert manifest["skipped"].get("duplicate_id") == EXPECTED_SKIPS["duplicate_id"], "duplicate ids not counted"
    assert manifest["samples"] == len(ds) == len(NORMALISED)


def test_every_stored_image_is_a_bounded_rgb_jpeg(converted) -> None:
    _, ds, index, _ = converted
    for uid, i in index.items():
        image = _decode(ds.jpeg(i))
        assert image.format == "JPEG" and image.mode == "RGB", uid
        assert max(image.size) <= MAX_SIDE, uid


def test_stored_images_are_normalised_as_documented(converted) -> None:
    _, ds, index, by_uid = converted

    def stored(uid: str) -> Image.Image:
        return _decode(ds.jpeg(index[uid]))

    _check_alpha(stored("alpha"))
    _check_palette(stored("palette"))
    _check_palette_transparent(stored("palette_transparent"))
    _check_cmyk(stored("cmyk"))
    _check_deep(stored("deep"))
    _check_grey(stored("grey"))
    _check_grey(stored("grey_jpeg"))
    _check_rotated(stored("rotated"))
    assert stored("big").size == (64, 32)
    assert ds.jpeg(index["kept"]).tobytes() == by_uid["kept"]  # the first "kept", byte for byte
    assert ds.jpeg(index["twin"]).tobytes() == by_uid["twin"]  # twin.jpg, the first of the two


def test_captions_are_cleaned_truncated_and_replaced(converted) -> None:
    _, ds, index, _ = converted
    assert ds.captions(index["latin1"]) == ["caf\ufffd \ufffd\ufffd cr\u00e8me"]
    assert ds.captions(index["alpha"]) == ["a picture called alpha"]
    tokens = ds.tokens(index["long_caption"])
    assert tokens.shape == (3, 77)
    assert tokens[0, 0] == START and tokens[0, 76] == END and (tokens[0] != 0).all()  # truncated, end kept
    assert not tokens[1:].any()
    assert ds.captions(index["long_caption"]) == [LONG_CAPTION]  # the text itself is kept whole
