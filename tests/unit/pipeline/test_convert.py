"""Conversion to schema-v1 .beton shards, read back by FFCV's own Loader and by our reader."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert import ConvertOptions, convert
from pipeline.reader import BetonDataset
from pipeline.schema import MANIFEST, DatasetError, sha256_file
from pipeline.sources import folder
from pipeline.text import tokenize


def _jpeg(rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> bytes:
    # Smooth colour fields: decoders differ in chroma upsampling, which noise would exaggerate.
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    a, b, c = rng.uniform(0, 255, 3)
    pixels = np.stack([a * xx + 40, b * yy + 20, c * (1 - xx) * yy + 10], axis=-1).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=92)
    return out.getvalue()


def _samples(n: int, seed: int = 0) -> list[tuple[str, bytes, list[str]]]:
    rng = np.random.default_rng(seed)
    return [(f"img{i}", _jpeg(rng), [f"a photo number {i}", f"  caption\tnumber  {i} "][: 1 + i % 2]) for i in range(n)]


OPTS = ConvertOptions(max_side=64, captions_per_image=3, shard_size=7, workers=1)


def test_round_trip_through_ffcvs_own_loader(tmp_path: Path) -> None:
    from ffcv.fields.decoders import BytesDecoder, IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    samples = _samples(17)
    manifest = convert(samples, tmp_path / "out", source="test", options=OPTS, progress=False)
    assert manifest["samples"] == 17 and [s["samples"] for s in manifest["shards"]] == [7, 7, 3]

    seen = 0
    ours = BetonDataset(tmp_path / "out")
    ids = ours.ids()
    for shard in manifest["shards"]:
        loader = Loader(
            str(tmp_path / "out" / shard["file"]),
            batch_size=4,
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            num_workers=1,
            pipelines={
                "image": [SimpleRGBImageDecoder()],
                "tokens": [NDArrayDecoder()],
                "n_captions": [IntDecoder()],
                "uid": [IntDecoder()],
                "text": [BytesDecoder()],
            },
        )
        for images, tokens, n_captions, uids, texts in loader:
            for j in range(len(uids)):
                uid = int(uids[j, 0])
                name, data, captions = samples[uid]
                assert ids[uid] == name
                expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                # Small RGB JPEGs are stored byte for byte, so FFCV decodes the very same pixels.
                diff = np.abs(images[j].astype(int) - expected.astype(int))
                assert diff.max() <= 8 and diff.mean() < 1.5  # libjpeg-turbo vs PIL rounding
                cleaned = [" ".join(c.split()) for c in captions]
                assert int(n_captions[j, 0]) == len(cleaned)
                np.testing.assert_array_equal(tokens[j, : len(cleaned)], tokenize(cleaned))
                assert not tokens[j, len(cleaned) :].any()
                # FFCV's BytesDecoder pads every row to the batch's longest, with stale bytes.
                expected_text = "\n".join(cleaned).encode()
                assert bytes(texts[j])[: len(expected_text)] == expected_text
                # slipstream's reader sees the very same sample.
                np.testing.assert_array_equal(tokens[j], ours.tokens(uid))
                assert ours.captions(uid) == cleaned and ours.image_size(uid) == images[j].shape[:2]
                ours_pixels = np.asarray(Image.open(io.BytesIO(ours.jpeg(uid).tobytes())).convert("RGB"))
                assert np.abs(ours_pixels.astype(int) - images[j].astype(int)).max() <= 8
                seen += 1
    assert seen == 17


def test_reader_matches_the_source(tmp_path: Path) -> None:
    samples = _samples(10, seed=3)
    convert(samples, tmp_path / "out", source="test", options=OPTS, progress=False)
    ds = BetonDataset(tmp_path / "out")
    assert len(ds) == 10
    for i, (_, data, captions) in enumerate(samples):
        assert ds.jpeg(i).tobytes() == data  # kept byte for byte, and a view into the map
        assert isinstance(ds.jpeg(i), np.memmap)
        assert ds.captions(i) == [" ".join(c.split()) for c in captions]
        assert ds.tokens(i).shape == (3, 77) and ds.tokens(i).dtype == np.int32


def test_manifest_records_what_was_written(tmp_path: Path) -> None:
    bad = [("empty", b"", ["x"]), ("noise", b"\x00garbage" * 9, ["x"]), ("blank", _samples(1)[0][1], ["   "])]
    manifest = convert(_samples(5) + bad, tmp_path / "out", source="test", options=OPTS, progress=False)
    assert manifest["skipped"] == {"empty_file": 1, "no_caption": 1, "undecodable": 1}
    on_disk = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert on_disk == manifest
    for key in ("schema_version", "source", "samples", "skipped", "shards", "tokenizer", "context_length",
                "captions_per_image", "max_side", "quality"):  # fmt: skip
        assert key in manifest
    for shard in manifest["shards"]:
        assert sha256_file(tmp_path / "out" / shard["file"]) == shard["sha256"]


def test_large_images_are_resized_to_max_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    convert([("big", _jpeg(rng, (200, 100)), ["wide"])], tmp_path / "out", source="test", options=OPTS, progress=False)
    image = Image.open(io.BytesIO(BetonDataset(tmp_path / "out").jpeg(0).tobytes()))
    assert image.size == (64, 32) and image.mode == "RGB"


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    def exploding():
        yield from _samples(3)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        convert(exploding(), tmp_path / "out", source="test", options=OPTS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_to_write_nothing(tmp_path: Path) -> None:
    convert(_samples(2), tmp_path / "out", source="test", options=OPTS, progress=False)
    with pytest.raises(DatasetError, match="already holds a converted dataset"):
        convert(_samples(2), tmp_path / "out", source="test", options=OPTS, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not an empty directory"):
        convert(_samples(2), tmp_path / "busy", source="test", options=OPTS, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(DatasetError, match=r"no usable samples \(undecodable=1\)"):
        convert([("x", b"junk", ["c"])], tmp_path / "none", source="test", options=OPTS, progress=False)
    assert not (tmp_path / "none").exists()


def test_folder_source_reads_sidecar_captions(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "a.jpg").write_bytes(_jpeg(rng))
    (tmp_path / "imgs" / "sub" / "a.txt").write_bytes(b"first\nsecond caf\xe9\n")  # latin-1, not UTF-8
    (tmp_path / "imgs" / "b.png").write_bytes(_jpeg(rng))  # no sidecar: no captions
    samples = list(folder.iter_samples(tmp_path / "imgs"))
    assert [(uid, caps) for uid, _, caps in samples] == [("b", []), ("sub/a", ["first", "second caf\ufffd"])]


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign", "manifest"])
def test_damaged_datasets_are_one_line_errors(tmp_path: Path, damage: str) -> None:
    convert(_samples(9), tmp_path / "out", source="test", options=OPTS, progress=False)
    shard = tmp_path / "out" / "shard-00000.beton"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "foreign":
        shard.write_bytes(b"PK\x03\x04 not a beton at all" * 100)
    else:
        (tmp_path / "out" / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError) as err:
        BetonDataset(tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "out") in message



def test_forked_workers_never_finalise_what_they_inherit(tmp_path: Path) -> None:
    # A converter worker that collected an inherited DALI pipeline segfaulted, and FFCV's
    # writer then waited for it forever; inherited objects must die in the parent only.
    import gc
    import os

    from pipeline.process_pool import fork_safe

    class Cyclic:
        def __init__(self) -> None:
            self.me = self  # only the collector can free it

        def __del__(self) -> None:
            (tmp_path / f"finalised-in-{os.getpid()}").touch()

    parent = os.getpid()
    Cyclic()  # already garbage at fork time
    alive = Cyclic()
    with fork_safe():
        child = os.fork()
        if child == 0:
            del alive  # garbage in the child only
            gc.collect()
            os._exit(0)
        os.waitpid(child, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"finalised-in-{parent}"]
    del alive


def test_a_worker_that_dies_stops_the_run_instead_of_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import pipeline.convert as convert_module
    from pipeline.sources import Sample

    real_read = convert_module.read_image

    def read_or_die(ref):  # forked workers inherit the patch
        if ref == "die":
            os._exit(9)  # as the kernel's OOM killer would end it
        return real_read(ref)

    monkeypatch.setattr(convert_module, "read_image", read_or_die)
    samples = [Sample(uid, data, caps) for uid, data, caps in _samples(40)]
    samples.insert(20, Sample("doomed", "die", ["x"]))
    options = ConvertOptions(max_side=64, captions_per_image=3, shard_size=7, workers=2)
    with pytest.raises(DatasetError, match="worker died"):
        convert(samples, tmp_path / "out", source="test", options=options, progress=False)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] is False and not list((tmp_path / "out").glob("*.partial"))
