"""`slip profile convert`: both sides run over the same files and report comparable figures."""
from pathlib import Path

from PIL import Image

from profiling.convert_bench import compare, synthetic_images
from slip.main import main


def test_synthetic_images_are_photo_sized_jpegs_with_captions(tmp_path: Path) -> None:
    folder = synthetic_images(tmp_path / "imgs", 4, seed=1)
    jpgs = sorted(folder.glob("*.jpg"))
    assert len(jpgs) == 4 and len(list(folder.glob("*.txt"))) == 4
    for path in jpgs:
        with Image.open(path) as image:
            assert image.format == "JPEG" and 400 <= min(image.size) and max(image.size) <= 640


def test_workers_write_the_same_images_as_one_process(tmp_path: Path) -> None:
    one = synthetic_images(tmp_path / "one", 5, seed=4)
    three = synthetic_images(tmp_path / "three", 5, seed=4, workers=3)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in three.iterdir()) and len(names) == 10
    assert all((one / n).read_bytes() == (three / n).read_bytes() for n in names)
    other = synthetic_images(tmp_path / "other", 1, seed=5)
    assert (other / "000000.jpg").read_bytes() != (one / "000000.jpg").read_bytes()


def test_compare_runs_both_sides_on_the_same_images(tmp_path: Path, monkeypatch) -> None:
    import profiling.convert_bench as bench

    folder = synthetic_images(tmp_path / "imgs", 6, seed=2)
    (folder / "notes.md").write_text("not an image")
    seen: dict[str, list[str]] = {"baseline": [], "slipstream": []}
    real_loop, real_convert = bench.baseline_loop, bench.convert

    def loop(paths, *args):
        seen["baseline"] += [p.stem for p in paths]
        return real_loop(paths, *args)

    def conv(samples, *args, **kwargs):
        samples = list(samples)
        seen["slipstream"] += [s.uid for s in samples]
        return real_convert(iter(samples), *args, **kwargs)

    monkeypatch.setattr(bench, "baseline_loop", loop)
    monkeypatch.setattr(bench, "convert", conv)
    results = compare(folder, [1, 2], max_side=128, shard_size=4)
    assert seen["baseline"] == [f"{i:06d}" for i in range(6)]
    assert seen["slipstream"] == seen["baseline"] * 2  # once per worker count
    assert results["images"] == 6
    assert set(results) >= {"baseline", "slipstream_workers_1", "slipstream_workers_2"}


def test_profile_convert_command(tmp_path: Path, capsys) -> None:
    folder = synthetic_images(tmp_path / "imgs", 3, seed=3)
    assert main(["profile", "convert", "--images", str(folder), "--workers", "1", "--max-side", "96", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"baseline"' in out and '"slipstream_workers_1"' in out
