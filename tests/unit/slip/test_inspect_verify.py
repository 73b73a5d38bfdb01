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
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "2 problem(s) in 30 samples, first:" in err  # one line; the report on stdout
    assert any(line.startswith("sample 3 ") for line in out.splitlines())


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


def test_inspect_png_alone_draws_the_default_grid(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slip.data import DEFAULT_GRID

    png = tmp_path / "default.png"
    assert main(["inspect", str(dataset), "--png", str(png)]) == 0
    assert f"contact sheet of {DEFAULT_GRID} samples" in capsys.readouterr().out
    with Image.open(png) as sheet:
        assert sheet.width == 4 * 192  # 16 tiles, 4 x 4


@pytest.mark.parametrize("grid", ["0", "-3"])
def test_inspect_refuses_an_empty_grid_in_one_line(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, grid: str) -> None:
    png = tmp_path / "none.png"
    assert main(["inspect", str(dataset), "--grid", grid, "--png", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--grid must be at least 1, got {grid}" in err
    assert not png.exists()


def test_inspect_names_the_first_skipped_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import io

    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import Sample, Skip
    from slip.data import SHOWN_SKIPS

    assert SHOWN_SKIPS < 24
    rng = np.random.default_rng(8)
    good = []
    for i in range(3):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(out, format="PNG")
        good.append((f"good{i}", out.getvalue(), [f"caption {i}"]))
    bad = [Sample(f"lost{i}", str(tmp_path / f"lost{i}.jpg"), ["c"]) for i in range(24)] + [Skip("table.csv:9", "malformed_annotation")]
    convert(good + bad, tmp_path / "ds", source="test", options=ConvertOptions(max_side=64, workers=1), progress=False)
    assert main(["inspect", str(tmp_path / "ds")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  skipped: malformed_annotation=1, missing_file=24" in lines
    named = [line.strip() for line in lines if line.startswith("    ")]
    # The first SHOWN_SKIPS, in source order, each with the file it names; then where the rest are.
    assert named == [f"missing_file: lost{i} ({tmp_path / f'lost{i}.jpg'})" for i in range(SHOWN_SKIPS)] + [
        f"... all 25 in {tmp_path / 'ds'}/skipped.jsonl"
    ]


def _verb_parsers() -> dict[str, object]:
    import argparse

    from slip import data

    root = argparse.ArgumentParser()
    data.add_parsers(root.add_subparsers())
    verbs = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    parsers = {name: verbs[name] for name in ("inspect", "verify")}
    convert_sources = next(a for a in verbs["convert"]._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update({f"convert {name}": p for name, p in convert_sources.choices.items()})
    return parsers


def test_every_option_of_the_data_verbs_says_what_it_does_and_its_default() -> None:
    parsers = _verb_parsers()
    assert "convert csv" in parsers and "inspect" in parsers
    for verb, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and action.help.strip(), f"slip {verb} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default is not None and action.default is not False and not action.required:
                assert f"(default: {action.default})" in text, f"slip {verb} {action.option_strings[0]}: default not shown"
        assert "(default: None)" not in text and "(default: False)" not in text


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
