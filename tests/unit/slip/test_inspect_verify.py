"""`slip inspect` and `slip verify` on a converted dataset, sound and damaged."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.reader import BetonDataset
from pipeline.verify import verify
from slip.main import main


@pytest.fixture()
def dataset(tmp_path: Path, make_shapes_beton) -> Path:
    return make_shapes_beton(tmp_path, seed=2, train_size=30, shard_size=16)


def test_verify_passes_a_sound_dataset(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify(dataset, progress=False) == (30, [])
    assert main(["verify", str(dataset)]) == 0
    assert "all 30 samples" in capsys.readouterr().out


def _offset_of(ds: BetonDataset, index: int) -> tuple[Path, int]:
    shard, i = ds._locate(index)
    return shard.path, int(shard.image_ptr[i])


def test_verify_finds_a_corrupted_image(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    path, offset = _offset_of(BetonDataset(dataset), 3)
    data = bytearray(path.read_bytes())
    data[offset + 2 : offset + 40] = bytes(38)  # wreck the JPEG header of sample 3
    path.write_bytes(bytes(data))
    _, problems = verify(dataset, progress=False)
    assert any("sha256 does not match" in p for p in problems)
    assert any(p.startswith("sample 3 ") for p in problems)
    assert main(["verify", str(dataset)]) == 1
    assert "problem(s) in 30 samples" in capsys.readouterr().err


def test_verify_finds_tokens_that_do_not_match_the_text(dataset: Path) -> None:
    ds = BetonDataset(dataset)
    shard, i = ds._locate(20)
    data = bytearray(shard.path.read_bytes())
    start = int(shard.tokens_ptr[i]) + 4  # the first BPE id after the start token
    data[start : start + 4] = np.int32(9999).tobytes()  # no caption here starts with this token
    shard.path.write_bytes(bytes(data))
    _, problems = verify(dataset, progress=False)
    assert any(p.startswith("sample 20 ") and "tokens do not match" in p for p in problems)


def test_inspect_summarises_and_draws(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "sheet.png"
    assert main(["inspect", str(dataset), "--grid", "9", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "30 samples from 'folder' in 2 shard(s)" in out and "skipped: none" in out
    with Image.open(png) as sheet:
        assert sheet.format == "PNG" and sheet.width == 3 * 192 and sheet.height > 3 * 192
        # Tiles are drawn: the sheet is not blank.
        assert len(np.unique(np.asarray(sheet.convert("L")))) > 50
    assert main(["inspect", str(dataset), "--grid", "4"]) == 2  # no --png: a one-line error
    assert "needs --png" in capsys.readouterr().err


def test_interrupted_dataset_is_refused_by_readers(dataset: Path) -> None:
    import json

    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["complete"] = False
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="interrupted.*--resume"):
        BetonDataset(dataset)


def test_a_missing_image_allocation_is_named() -> None:
    from pipeline.reader import _allocation_sizes

    ids, ptrs, sizes = np.array([0, 0, 1, 1]), np.array([10, 50, 90, 130]), np.array([40, 40, 40, 40])
    assert list(_allocation_sizes(ids, ptrs, sizes, np.array([50, 90]))) == [40, 40]
    assert list(_allocation_sizes(ids, ptrs, sizes, np.array([50, 91]))) == [40, -1]  # the reader turns -1 into a DatasetError
