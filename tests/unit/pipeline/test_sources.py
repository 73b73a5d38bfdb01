"""Every dataset source on a tiny hand-made fixture: parsing, the real converter, errors, command line."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert import ConvertOptions, convert
from pipeline.reader import BetonDataset
from pipeline.sources import Sample, Skip, SourceError, cc, coco, folder, redcaps, wds, yfcc
from pipeline.sources import csv as csv_source
from pipeline.sources.registry import SOURCES

OPTS = ConvertOptions(max_side=64, captions_per_image=3, workers=1)


def _jpeg(rng: np.random.Generator, size: tuple[int, int] = (40, 32), fmt: str = "JPEG") -> bytes:
    # Smooth colour fields: small, and kept byte for byte by the converter (no resize needed).
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    a, b, c = rng.uniform(0, 255, 3)
    pixels = np.stack([a * xx + 40, b * yy + 20, c * (1 - xx) * yy + 10], axis=-1).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@dataclass
class Fixture:
    """A tiny dataset in one layout and everything the tests expect of it."""

    module: object
    kwargs: dict  # for iter_samples
    argv: list[str]  # the same, as a command line
    records: list[Sample | Skip]  # exactly what iter_samples yields, in order
    skipped: dict[str, int]  # the converter's manifest["skipped"]
    # (uid, captions, the JPEG bytes stored, or None where the converter re-encodes the image)
    stored: list[tuple[str, list[str], bytes | None]] = field(default_factory=list)


def _coco(tmp: Path, rng: np.random.Generator) -> Fixture:
    images = tmp / "train2017"
    one, two, _ = (_write(images / f"{i:012d}.jpg", _jpeg(rng)).read_bytes() for i in (1, 2, 4))
    ann = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg"},
            {"id": 2, "file_name": "000000000002.jpg"},
            {"id": 3, "file_name": "000000000003.jpg"},  # listed, never downloaded
            {"id": 4, "file_name": "000000000004.jpg"},  # no caption at all
            {"file_name": "no_id.jpg"},  # malformed
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A cat on a mat."},
            {"id": 11, "image_id": 2, "caption": "  two\tdogs  "},
            {"id": 12, "image_id": 1, "caption": "A small cat."},
            {"id": 13, "image_id": 99, "caption": "an orphan caption"},  # unknown image: malformed
            {"id": 14, "image_id": 3, "caption": "gone"},
        ],
    }
    path = _write(tmp / "annotations" / "captions_train2017.json", json.dumps(ann))
    return Fixture(
        coco,
        {"images": images, "annotations": path},
        ["--images", str(images), "--annotations", str(path)],
        [
            Skip("annotation 13", "malformed_annotation"),
            Sample("1", str(images / "000000000001.jpg"), ["A cat on a mat.", "A small cat."]),
            Sample("2", str(images / "000000000002.jpg"), ["  two\tdogs  "]),
            Sample("3", str(images / "000000000003.jpg"), ["gone"]),
            Sample("4", str(images / "000000000004.jpg"), []),
            Skip("#4", "malformed_annotation"),
        ],
        {"malformed_annotation": 2, "missing_file": 1, "no_caption": 1},
        [("1", ["A cat on a mat.", "A small cat."], one), ("2", ["  two\tdogs  "], two)],
    )


def _cc_npy(tmp: Path, rng: np.random.Generator) -> Fixture:
    root = tmp / "cc"
    a = _write(root / "1510438788.jpg", _jpeg(rng)).read_bytes()
    b = _write(root / "0.jpg", _jpeg(rng)).read_bytes()
    entries = [
        {"image_id": 1510438788, "captions": ["large field with pink tulips", "tulips"]},  # CC3M
        {"image_name": "0.jpg", "image_id": 0, "captions": ["a chair for sale"]},  # CC12M; id 0 is an id
        {"image_id": 7, "captions": "not a list"},  # malformed
        {"image_id": 404, "captions": ["never downloaded"]},
        "not a dict",  # malformed
    ]
    path = tmp / "cc3m.npy"
    np.save(path, np.array(entries, dtype=object), allow_pickle=True)
    return Fixture(
        cc,
        {"root": root, "annotations": path},
        ["--root", str(root), "--annotations", str(path)],
        [
            Sample("1510438788", str(root / "1510438788.jpg"), ["large field with pink tulips", "tulips"]),
            Sample("0", str(root / "0.jpg"), ["a chair for sale"]),
            Skip("cc3m.npy#2", "malformed_annotation"),
            Sample("404", str(root / "404.jpg"), ["never downloaded"]),
            Skip("cc3m.npy#4", "malformed_annotation"),
        ],
        {"malformed_annotation": 2, "missing_file": 1},
        [("1510438788", ["large field with pink tulips", "tulips"], a), ("0", ["a chair for sale"], b)],
    )


def _cc_tsv(tmp: Path, rng: np.random.Generator) -> Fixture:
    root = tmp / "cc"
    a = _write(root / "00000" / "1.jpg", _jpeg(rng)).read_bytes()
    b = _write(root / "00000" / "2.jpg", _jpeg(rng)).read_bytes()
    lines = [
        "caption\tpath",
        "a red  bus\t00000/1.jpg",
        "no tab on this line",  # malformed
        'a "quoted" caf\udce9\t00000/2.jpg',  # a bare quote, and a byte that is not UTF-8
        "one\ttoo\tmany",  # malformed
        "lost\t00000/3.jpg",
    ]
    data = "\n".join(lines).encode("utf-8", errors="surrogateescape") + b"\n"
    path = _write(tmp / "cc3m_train.tsv", data)
    return Fixture(
        cc,
        {"root": root, "annotations": path},
        ["--root", str(root), "--annotations", str(path)],
        [
            Sample("00000/1.jpg", str(root / "00000/1.jpg"), ["a red  bus"]),
            Skip("cc3m_train.tsv:3", "malformed_annotation"),
            Sample("00000/2.jpg", str(root / "00000/2.jpg"), ['a "quoted" caf\ufffd']),
            Skip("cc3m_train.tsv:5", "malformed_annotation"),
            Sample("00000/3.jpg", str(root / "00000/3.jpg"), ["lost"]),
        ],
        {"malformed_annotation": 2, "missing_file": 1},
        [("00000/1.jpg", ["a red  bus"], a), ("00000/2.jpg", ['a "quoted" caf\ufffd'], b)],
    )


def _yfcc(tmp: Path, rng: np.random.Generator, fmt: str) -> Fixture:
    # The reference's layout: image 12345678 is 678.jpg inside images/12/345.zip.
    root = tmp / "yfcc100m"
    jpegs = {12345678: _jpeg(rng), 12345001: _jpeg(rng), 5: _jpeg(rng)}
    archives = {"12/345.zip": {"678.jpg": 12345678, "001.jpg": 12345001}, "00/000.zip": {"005.jpg": 5}}
    for zip_path, members in archives.items():
        (root / "images" / zip_path).parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / "images" / zip_path, "w") as z:
            for member, index in members.items():
                z.writestr(member, jpegs[index])
    if fmt == "pickle":
        rows = [
            (12345678, "a title", "a longer description"),
            (5, "", "only a description"),
            (12345999, "member absent", ""),
            ("twelve", 1, None),  # malformed
            (99000000, "zip absent", "  "),
            (12345001, "title only", ""),
        ]
        path, bad_uid = _write(tmp / "yfcc15m.pkl", pickle.dumps(rows)), "yfcc15m.pkl#3"
    else:
        text = (
            "index,title,description\n"
            '12345678,a title,"a longer description"\n'
            "00000005,,only a description\n"
            "12345999,member absent,\n"
            "twelve,malformed,row\n"
            "99000000,zip absent,\n"
            "12345001,title only,\n"
        )
        path, bad_uid = _write(tmp / "yfcc15m.csv", text), "yfcc15m.csv:5"
    z = str(root / "images" / "12" / "345.zip")
    return Fixture(
        yfcc,
        {"root": root, "metadata": path},
        ["--root", str(root), "--metadata", str(path)],
        [
            Sample("12345678", (z, "678.jpg"), ["a title", "a longer description"]),
            Sample("00000005", (str(root / "images" / "00" / "000.zip"), "005.jpg"), ["only a description"]),
            Sample("12345999", (z, "999.jpg"), ["member absent"]),  # the zip exists, the member does not
            Skip(bad_uid, "malformed_annotation"),
            Sample("99000000", (str(root / "images" / "99" / "000.zip"), "000.jpg"), ["zip absent"]),
            Sample("12345001", (z, "001.jpg"), ["title only"]),
        ],
        {"malformed_annotation": 1, "missing_file": 2},
        [
            ("12345678", ["a title", "a longer description"], jpegs[12345678]),
            ("00000005", ["only a description"], jpegs[5]),
            ("12345001", ["title only"], jpegs[12345001]),
        ],
    )


def _redcaps(tmp: Path, rng: np.random.Generator) -> Fixture:
    images = tmp / "redcaps"
    a = _write(images / "pics" / "abc1.jpg", _jpeg(rng)).read_bytes()
    b = _write(images / "itookapicture" / "abc2.jpg", _jpeg(rng)).read_bytes()
    anns = [
        {"image_id": "abc1", "subreddit": "pics", "caption": "my dog at the beach", "url": "u"},
        {"image_id": "abc2", "subreddit": "itookapicture", "caption": "itap of a sunset"},
        {"image_id": "abc3", "subreddit": "pics"},  # no caption: malformed
        {"image_id": "gone", "subreddit": "pics", "caption": "deleted from reddit"},
    ]
    path = _write(tmp / "redcaps_v1.json", json.dumps(anns))
    return Fixture(
        redcaps,
        {"images": images, "annotations": path},
        ["--images", str(images), "--annotations", str(path)],
        [
            Sample("abc1", str(images / "pics" / "abc1.jpg"), ["my dog at the beach"]),
            Sample("abc2", str(images / "itookapicture" / "abc2.jpg"), ["itap of a sunset"]),
            Skip("abc3", "malformed_annotation"),
            Sample("gone", str(images / "pics" / "gone.jpg"), ["deleted from reddit"]),
        ],
        {"malformed_annotation": 1, "missing_file": 1},
        [("abc1", ["my dog at the beach"], a), ("abc2", ["itap of a sunset"], b)],
    )


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _wds(tmp: Path, rng: np.random.Generator) -> Fixture:
    shards = tmp / "shards"
    j0, j1, j2, j3, png = _jpeg(rng), _jpeg(rng), _jpeg(rng), _jpeg(rng), _jpeg(rng, fmt="PNG")
    _tar(shards / "00000.tar", [
        ("000000000.jpg", j0), ("000000000.txt", b"a cat in a tar"), ("000000000.json", b'{"caption": "a cat in a tar"}'),
        ("000000001.jpg", j1), ("000000001.json", b'{"caption": "only in json", "url": "x"}'),
        ("000000002.jpg", j2),  # no caption
        ("000000003.jpg", j3), ("000000003.json", b"{not json"),  # malformed
    ])  # fmt: skip
    _tar(shards / "00001.tar", [
        ("000010000.png", png), ("000010000.txt", "caf\u00e9 au lait".encode()),
        ("000010001.txt", b"caption without an image"),
    ])  # fmt: skip
    _write(shards / "00000_stats.json", "{}")  # img2dataset's side files are not shards
    return Fixture(
        wds,
        {"shards": shards},
        ["--shards", str(shards)],
        [
            Sample("00000/000000000", j0, ["a cat in a tar"]),
            Sample("00000/000000001", j1, ["only in json"]),
            Sample("00000/000000002", j2, []),
            Skip("00000/000000003", "malformed_annotation"),
            Sample("00001/000010000", png, ["caf\u00e9 au lait"]),
            Skip("00001/000010001", "missing_file"),
        ],
        {"malformed_annotation": 1, "missing_file": 1, "no_caption": 1},
        [
            ("00000/000000000", ["a cat in a tar"], j0),
            ("00000/000000001", ["only in json"], j1),
            ("00001/000010000", ["caf\u00e9 au lait"], None),  # PNG: re-encoded as JPEG
        ],
    )


def _csv(tmp: Path, rng: np.random.Generator) -> Fixture:
    root = tmp / "imgs"
    a = _write(root / "a.jpg", _jpeg(rng)).read_bytes()
    c = _write(root / "sub" / "c.jpg", _jpeg(rng)).read_bytes()
    text = (
        "file,text,source\n"
        'a.jpg,"hello, world",web\n'
        "b.jpg,,web\n"  # an empty caption is not malformed (b.jpg is missing_file: the image is checked first)
        ",an orphan caption,web\n"  # no image: malformed
        "missing.jpg,never downloaded,web\n"
        "sub/c.jpg,a third   one,web\n"
        "a.jpg,a second look,web\n"  # a.jpg's second caption, rows apart: yielded here, with both
    )
    path = _write(tmp / "pairs.csv", text)
    return Fixture(
        csv_source,
        {"table": path, "root": root, "image_column": "file", "caption_column": "text"},
        ["--table", str(path), "--root", str(root), "--image-column", "file", "--caption-column", "text"],
        [
            Sample("b.jpg", str(root / "b.jpg"), [""]),
            Skip("pairs.csv:4", "malformed_annotation"),
            Sample("missing.jpg", str(root / "missing.jpg"), ["never downloaded"]),
            Sample("sub/c.jpg", str(root / "sub" / "c.jpg"), ["a third   one"]),
            Sample("a.jpg", str(root / "a.jpg"), ["hello, world", "a second look"]),
        ],
        {"malformed_annotation": 1, "missing_file": 2},
        [("sub/c.jpg", ["a third   one"], c), ("a.jpg", ["hello, world", "a second look"], a)],
    )


def _folder(tmp: Path, rng: np.random.Generator) -> Fixture:
    images = tmp / "folder"
    a = _write(images / "a.jpg", _jpeg(rng)).read_bytes()
    _write(images / "a.txt", "first caption\nsecond caption\n")
    b = _write(images / "sub" / "b.jpg", _jpeg(rng)).read_bytes()
    _write(images / "sub" / "b.txt", "only one")
    _write(images / "z.jpg", _jpeg(rng))  # no sidecar
    return Fixture(
        folder,
        {"images": images},
        ["--images", str(images)],
        [
            Sample("a", str(images / "a.jpg"), ["first caption", "second caption"]),
            Sample("sub/b", str(images / "sub" / "b.jpg"), ["only one"]),
            Sample("z", str(images / "z.jpg"), []),
        ],
        {"no_caption": 1},
        [("a", ["first caption", "second caption"], a), ("sub/b", ["only one"], b)],
    )


BUILDERS: dict[str, Callable[[Path, np.random.Generator], Fixture]] = {
    "coco": _coco,
    "cc-npy": _cc_npy,
    "cc-tsv": _cc_tsv,
    "yfcc-pickle": lambda tmp, rng: _yfcc(tmp, rng, "pickle"),
    "yfcc-csv": lambda tmp, rng: _yfcc(tmp, rng, "csv"),
    "redcaps": _redcaps,
    "wds": _wds,
    "csv": _csv,
    "folder": _folder,
}


@pytest.fixture(params=list(BUILDERS))
def fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Fixture:
    return BUILDERS[request.param](tmp_path / "data", np.random.default_rng(len(request.param)))


def _iter(f: Fixture) -> list[Sample | Skip]:
    if f.module is folder:  # folder's iter_samples predates keyword-only arguments
        return list(folder.iter_samples(f.kwargs["images"]))
    return list(f.module.iter_samples(**f.kwargs))


def test_iter_samples_yields_the_records_in_order(fixture: Fixture) -> None:
    records = _iter(fixture)
    assert records == fixture.records
    assert _iter(fixture) == records  # deterministic: a second pass is identical


def test_converts_and_reads_back(fixture: Fixture, tmp_path: Path) -> None:
    manifest = convert(_iter(fixture), tmp_path / "out", source=fixture.module.NAME, options=OPTS, progress=False)
    assert manifest["source"] == fixture.module.NAME
    assert manifest["skipped"] == fixture.skipped
    assert manifest["samples"] == len(fixture.stored)
    ds = BetonDataset(tmp_path / "out")
    # Ids live in per-shard .ids files read by `ids()`; older manifests listed them inline.
    ids = ds.ids() if hasattr(ds, "ids") else manifest["ids"]
    assert ids == [uid for uid, _, _ in fixture.stored]
    assert len(ds) == len(fixture.stored)
    for i, (_, captions, jpeg) in enumerate(fixture.stored):
        assert ds.captions(i) == [" ".join(c.split()) for c in captions]
        assert int(ds.n_captions[i]) == len(captions)
        stored = ds.jpeg(i).tobytes()
        if jpeg is not None:
            assert stored == jpeg  # small JPEGs are kept byte for byte: the right image was read
        assert Image.open(io.BytesIO(stored)).format == "JPEG"


def test_from_args_parses_a_command_line(fixture: Fixture) -> None:
    parser = argparse.ArgumentParser(prog=f"slip convert {fixture.module.NAME}")
    fixture.module.add_arguments(parser)
    args = parser.parse_args(fixture.argv)
    assert list(fixture.module.from_args(args)) == fixture.records


@pytest.mark.parametrize("name", list(SOURCES))
def test_required_options_are_required(name: str) -> None:
    parser = argparse.ArgumentParser(prog=name)
    SOURCES[name].add_arguments(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{name} --{action.dest} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_registry_lists_every_source_in_order() -> None:
    assert list(SOURCES) == ["coco", "cc", "yfcc", "redcaps", "wds", "csv", "folder", "classes"]
    for name, module in SOURCES.items():
        assert module.NAME == name
        assert module.HELP and "\n" not in module.HELP
        assert callable(module.add_arguments) and callable(module.from_args) and callable(module.iter_samples)


# --- sources that cannot be read at all: one-line SourceError naming the file, before any record ---


def _unreadable(tmp: Path, rng: np.random.Generator) -> list[tuple[str, Callable[[], object], str]]:
    """(case, a call that must raise, the file name the message must carry)."""
    good = {name: BUILDERS[name](tmp / name, rng) for name in ("coco", "cc-npy", "yfcc-pickle", "redcaps", "wds", "csv")}
    bad_json = _write(tmp / "broken.json", '{"images": [')
    bad_npy = _write(tmp / "broken.npy", b"\x93NUMPY garbage")
    bad_pkl = _write(tmp / "broken.pkl", b"not a pickle")
    bad_tar = _write(tmp / "bad_shards" / "00000.tar", b"\x00garbage" * 200)
    bad_csv = _write(tmp / "header.csv", "path,caption\na.jpg,x\n")
    coco_kw, cc_kw = good["coco"].kwargs, good["cc-npy"].kwargs
    yfcc_kw, red_kw, csv_kw = good["yfcc-pickle"].kwargs, good["redcaps"].kwargs, good["csv"].kwargs
    return [
        ("coco missing", lambda: coco.iter_samples(images=coco_kw["images"], annotations=tmp / "nope.json"), "nope.json"),
        ("coco not json", lambda: coco.iter_samples(images=coco_kw["images"], annotations=bad_json), "broken.json"),
        ("coco no images dir", lambda: coco.iter_samples(images=tmp / "noimg", annotations=coco_kw["annotations"]), "noimg"),
        ("cc missing", lambda: cc.iter_samples(root=cc_kw["root"], annotations=tmp / "cc3m_gone.npy"), "cc3m_gone.npy"),
        ("cc not npy", lambda: cc.iter_samples(root=cc_kw["root"], annotations=bad_npy), "broken.npy"),
        ("cc no root", lambda: cc.iter_samples(root=tmp / "noroot", annotations=cc_kw["annotations"]), "noroot"),
        ("yfcc missing", lambda: yfcc.iter_samples(root=yfcc_kw["root"], metadata=tmp / "y.pkl"), "y.pkl"),
        ("yfcc not pickle", lambda: yfcc.iter_samples(root=yfcc_kw["root"], metadata=bad_pkl), "broken.pkl"),
        ("yfcc bad header", lambda: yfcc.iter_samples(root=yfcc_kw["root"], metadata=bad_csv), "header.csv"),
        ("yfcc no images", lambda: yfcc.iter_samples(root=tmp / "yroot", metadata=yfcc_kw["metadata"]), "yroot"),
        ("redcaps missing", lambda: redcaps.iter_samples(images=red_kw["images"], annotations=tmp / "r.json"), "r.json"),
        ("redcaps not json", lambda: redcaps.iter_samples(images=red_kw["images"], annotations=bad_json), "broken.json"),
        ("wds no shards", lambda: wds.iter_samples(shards=tmp / "none" / "*.tar"), "none"),
        ("wds bad tar", lambda: wds.iter_samples(shards=bad_tar.parent), "00000.tar"),
        ("csv missing", lambda: csv_source.iter_samples(**{**csv_kw, "table": tmp / "t.csv"}), "t.csv"),
        ("csv no column", lambda: csv_source.iter_samples(**{**csv_kw, "table": bad_csv}), "header.csv"),
        ("csv no root", lambda: csv_source.iter_samples(**{**csv_kw, "root": tmp / "croot"}), "croot"),
        ("folder missing", lambda: folder.iter_samples(tmp / "nofolder"), "nofolder"),
    ]


def test_unreadable_sources_are_one_line_errors(tmp_path: Path) -> None:
    cases = _unreadable(tmp_path, np.random.default_rng(5))
    for case, call, name in cases:
        records = call()
        with pytest.raises(SourceError) as err:
            next(iter(records))  # raised at the start of iteration, before any record
        message = str(err.value)
        assert name in message and "\n" not in message, (case, message)


def test_wds_shard_order_is_sorted_and_bad_tar_raises_before_any_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    _tar(tmp_path / "s" / "b.tar", [("k.jpg", _jpeg(rng)), ("k.txt", b"second")])
    _tar(tmp_path / "s" / "a.tar", [("k.jpg", _jpeg(rng)), ("k.txt", b"first")])
    assert [s.uid for s in wds.iter_samples(shards=str(tmp_path / "s" / "*.tar"))] == ["a/k", "b/k"]
    _write(tmp_path / "s" / "c.tar", b"junk" * 300)  # sorted last, yet checked first
    records = wds.iter_samples(shards=tmp_path / "s")
    with pytest.raises(SourceError, match="c.tar"):
        next(records)


def test_csv_tsv_and_explicit_delimiters(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    tsv = _write(tmp_path / "t.tsv", 'img\tcap\nx.jpg\ta "bare quote, and comma"\n')
    rows = list(csv_source.iter_samples(table=tsv, root=tmp_path / "r", image_column="img", caption_column="cap"))
    assert rows == [Sample("x.jpg", str(tmp_path / "r" / "x.jpg"), ['a "bare quote, and comma"'])]
    txt = _write(tmp_path / "t.txt", "img;cap\ny.jpg;semi\n")
    with pytest.raises(SourceError, match="t.txt.*--delimiter"):
        next(csv_source.iter_samples(table=txt, root=tmp_path / "r", image_column="img", caption_column="cap"))
    parser = argparse.ArgumentParser()
    csv_source.add_arguments(parser)
    args = parser.parse_args(["--table", str(txt), "--root", str(tmp_path / "r"), "--image-column", "img",
                              "--caption-column", "cap", "--delimiter", ";"])  # fmt: skip
    assert [s.captions for s in csv_source.from_args(args)] == [["semi"]]
    args.delimiter, args.table = "tab", str(tsv)
    assert len(list(csv_source.from_args(args))) == 1


def test_redcaps_accepts_a_per_subreddit_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    ann = {"info": {"subreddit": "pics"}, "annotations": [{"image_id": "q1", "subreddit": "pics", "caption": "c"}]}
    path = _write(tmp_path / "pics_2020.json", json.dumps(ann))
    assert list(redcaps.iter_samples(images=tmp_path / "img", annotations=path)) == [
        Sample("q1", str(tmp_path / "img" / "pics" / "q1.jpg"), ["c"])
    ]


def test_yfcc_path_follows_the_reference_layout(tmp_path: Path) -> None:
    # SLIP README: "image 12345678 is stored as 678.jpg within 12/345.zip".
    assert yfcc.image_ref(tmp_path, 12345678) == (str(tmp_path / "images" / "12" / "345.zip"), "678.jpg")
    assert yfcc.image_ref(tmp_path, 42) == (str(tmp_path / "images" / "00" / "000.zip"), "042.jpg")


def test_paths_that_leave_the_root_are_malformed(tmp_path: Path) -> None:
    from pipeline.sources import Skip, read_image
    from pipeline.sources import csv as csv_source

    (tmp_path / "root").mkdir()
    table = tmp_path / "t.csv"
    table.write_text("path,caption\n../secret.jpg,up and out\n/etc/passwd,absolute\nok.jpg,fine\n")
    records = list(csv_source.iter_samples(table=table, root=tmp_path / "root", image_column="path", caption_column="caption"))
    assert records[:2] == [Skip("../secret.jpg", "malformed_annotation"), Skip("/etc/passwd", "malformed_annotation")]
    assert records[2].image == str(tmp_path / "root" / "ok.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        read_image(str(fifo))  # a FIFO would block the worker forever


def test_a_csv_the_csv_module_cannot_parse_is_a_one_line_source_error(tmp_path: Path) -> None:
    from pipeline.sources import SourceError
    from pipeline.sources import csv as csv_source

    (tmp_path / "root").mkdir()
    table = tmp_path / "t.csv"
    table.write_text("path,caption\na.jpg," + "x" * 200_000 + "\n")  # past the csv module's field limit
    with pytest.raises(SourceError, match=r"t.csv: line \d+: field larger than field limit"):
        list(csv_source.iter_samples(table=table, root=tmp_path / "root", image_column="path", caption_column="caption"))
