"""One row per caption (Flickr30k's layout) -> one sample per image, and one skip vocabulary."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert import ConvertOptions, convert
from pipeline.reader import BetonDataset
from pipeline.skips import CAPTIONS_DROPPED, SKIPPED
from pipeline.sources import Records, Sample, Skip, cc, coco, rows
from pipeline.sources import csv as csv_source

K = 5


def _jpeg(rng: np.random.Generator) -> bytes:
    yy, xx = np.mgrid[0:32, 0:40] / 40
    a, b, c = rng.uniform(0, 255, 3)
    pixels = np.stack([a * xx + 40, b * yy + 20, c * (1 - xx) * yy + 10], axis=-1).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _words(rng: np.random.Generator) -> str:
    vocab = ["dog", "cat", "red", "ball", "park", "runs", "two", "men", "sit", "bench", "the", "a", "on", "in"]
    return " ".join(rng.choice(vocab, rng.integers(3, 9)))


@pytest.fixture()
def flickr(tmp_path: Path) -> tuple[Path, Path, dict[str, list[str]]]:
    """A Flickr30k-style table (`image_name| comment_number| comment`), rows shuffled so that an
    image's rows are mostly apart; returns (table, image root, each image's captions in row order)."""
    rng = np.random.default_rng(30)
    root = tmp_path / "flickr30k_images"
    root.mkdir()
    rows_: list[tuple[str, int, str]] = []
    for i in range(12):
        name = f"{rng.integers(10**8, 10**9)}.jpg"
        (root / name).write_bytes(_jpeg(rng))
        for j in range(7 if i == 0 else int(rng.integers(1, 8))):  # up to 7 captions: some past K
            rows_.append((name, j, _words(rng)))
    rows_ = [rows_[i] for i in rng.permutation(len(rows_))]
    expected: dict[str, list[str]] = {}
    for name, _, caption in rows_:
        expected.setdefault(name, []).append(caption)
    table = tmp_path / "results.csv"
    table.write_text("image_name| comment_number| comment\n" + "".join(f"{n}| {j}| {c}\n" for n, j, c in rows_))
    return table, root, expected


def test_a_table_of_one_row_per_caption_becomes_one_sample_per_image(flickr, tmp_path: Path) -> None:
    table, root, expected = flickr
    # Flickr30k's header has a space after each `|`; the space is part of the column name.
    records = csv_source.iter_samples(table=table, root=root, image_column="image_name", caption_column=" comment",
                                      delimiter="pipe")  # fmt: skip
    assert records.total is None  # nothing is read before the first record is asked for
    samples = list(records)
    assert records.total == len(expected) == len(samples)
    assert {s.uid: [c.strip() for c in s.captions] for s in samples} == expected
    manifest = convert(samples, tmp_path / "out", source="csv", options=ConvertOptions(max_side=64, captions_per_image=K, workers=1), progress=False)
    assert manifest["skipped"] == {}  # no duplicate_id: the rows are captions
    extra = sum(max(0, len(c) - K) for c in expected.values())
    assert extra > 0 and manifest["captions_dropped"] == {"extra_caption": extra}
    ds = BetonDataset(tmp_path / "out")
    for i, uid in enumerate(ds.ids()):
        assert ds.captions(i) == [" ".join(c.split()) for c in expected[uid][:K]]


def test_grouping_is_right_even_when_every_image_hash_collides(flickr, monkeypatch: pytest.MonkeyPatch) -> None:
    table, root, expected = flickr
    kwargs = dict(table=table, root=root, image_column="image_name", caption_column=" comment", delimiter="|")
    honest = list(csv_source.iter_samples(**kwargs))
    monkeypatch.setattr(rows, "_hash", lambda image: 7)  # every image in one hash bucket
    colliding = list(csv_source.iter_samples(**kwargs))
    assert sorted(colliding) == sorted(honest) and len(colliding) == len(expected)


def test_adjacent_rows_keep_the_file_order(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("path\tcaption\nb.jpg\tb one\nb.jpg\tb two\na.jpg\ta one\nc.jpg\tc one\nc.jpg\t\n")
    records = list(csv_source.iter_samples(table=table, root=tmp_path, image_column="path", caption_column="caption"))
    assert [(s.uid, s.captions) for s in records] == [("b.jpg", ["b one", "b two"]), ("a.jpg", ["a one"]), ("c.jpg", ["c one", ""])]


def test_cc_tsv_lines_of_one_path_are_one_image(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    tsv = tmp_path / "train.tsv"
    tsv.write_text("caption\tpath\nfirst\tx/1.jpg\nother\tx/2.jpg\nsecond\tx/1.jpg\nbroken line\n")
    records = cc.iter_samples(root=tmp_path / "img", annotations=tsv)
    assert list(records) == [
        Sample("x/2.jpg", str(tmp_path / "img" / "x/2.jpg"), ["other"]),
        Sample("x/1.jpg", str(tmp_path / "img" / "x/1.jpg"), ["first", "second"]),
        Skip("train.tsv:5", "malformed_annotation"),
    ]
    assert records.total == 3


def test_a_coco_image_listed_twice_is_a_duplicate_id(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    ann = {
        "images": [{"id": 5, "file_name": "a.jpg"}, {"id": 5, "file_name": "b.jpg"}, {"id": 6, "file_name": ""}],
        "annotations": [{"image_id": 5, "caption": "one"}, {"image_id": 5, "caption": "two"}],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(ann))
    records = coco.iter_samples(images=tmp_path / "img", annotations=path)
    assert list(records) == [
        Sample("5", str(tmp_path / "img" / "a.jpg"), ["one", "two"]),
        Skip("5", "duplicate_id"),
        Skip("6", "malformed_annotation"),
    ]
    assert records.total == 3


def test_records_say_how_many_they_are_once_read() -> None:
    def read(records: Records):
        records.total = 2
        yield Skip("a", "malformed_annotation")
        yield Skip("b", "malformed_annotation")

    records = Records(read)
    assert records.total is None
    assert next(records).uid == "a" and records.total == 2
    assert [r.uid for r in records] == ["b"]


def _reasons_in_code() -> set[str]:
    """Every reason a source or the converter gives, read from the code itself."""
    pipeline = Path(__file__).resolve().parents[3] / "pipeline"
    found: set[str] = set()
    for path in [*pipeline.glob("*.py"), *pipeline.glob("sources/*.py")]:
        text = path.read_text()
        found |= set(re.findall(r'BadSample\("(\w+)"', text))
        found |= set(re.findall(r'Skip\([^()]*(?:\([^()]*\)[^()]*)*,\s*"(\w+)"\)', text))
        found |= set(re.findall(r'bad_images\[i\] = "(\w+)"', text))
        found |= set(re.findall(r'run\.skipped\["(\w+)"\]', text))
    return found


def test_every_skip_reason_is_defined_once_with_its_meaning() -> None:
    used = _reasons_in_code()
    assert {"malformed_annotation", "duplicate_id", "missing_file", "no_caption", "too_small", "undecodable"} <= used
    assert used <= set(SKIPPED), used - set(SKIPPED)
    assert not set(SKIPPED) & set(CAPTIONS_DROPPED)
    for reason, meaning in {**SKIPPED, **CAPTIONS_DROPPED}.items():
        assert re.fullmatch(r"[a-z_]+", reason) and meaning and "\n" not in meaning
    from pipeline.images import MIN_SIDE

    assert str(MIN_SIDE) in SKIPPED["too_small"]  # the threshold is stated where the reason is defined


def test_empty_captions_are_dropped_and_counted_not_malformed(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    samples = [("a", _jpeg(rng), ["  ", "kept", "", "also kept"]), ("b", _jpeg(rng), ["\t", ""])]
    manifest = convert(samples, tmp_path / "out", source="test", options=ConvertOptions(max_side=64, captions_per_image=1, workers=1), progress=False)
    assert manifest["skipped"] == {"no_caption": 1}
    assert manifest["captions_dropped"] == {"empty_caption": 2, "extra_caption": 1}
    assert BetonDataset(tmp_path / "out").captions(0) == ["kept"]
