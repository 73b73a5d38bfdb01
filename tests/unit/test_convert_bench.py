"""`slip profile convert`: both sides run over the same files and report comparable figures."""
from pathlib import Path

from PIL import Image

from pipeline.convert_bench import compare, synthetic_images
from trainer.cli import main


def test_synthetic_images_are_photo_sized_jpegs_with_captions(tmp_path: Path) -> None:
    folder = synthetic_images(tmp_path / "imgs", 4, seed=1)
    jpgs = sorted(folder.glob("*.jpg"))
    assert len(jpgs) == 4 and len(list(folder.glob("*.txt"))) == 4
    for path in jpgs:
        with Image.open(path) as image:
            assert image.format == "JPEG" and 400 <= min(image.size) and max(image.size) <= 640


def test_compare_reports_both_sides_on_the_same_images(tmp_path: Path) -> None:
    folder = synthetic_images(tmp_path / "imgs", 6, seed=2)
    results = compare(folder, [1, 2], max_side=128, shard_size=4)
    assert results["images"] == 6 and results["baseline"]["images_per_s"] > 0
    for w in (1, 2):
        r = results[f"slipstream_workers_{w}"]
        assert r["images_per_s"] > 0
        assert abs(r["ratio"] - r["images_per_s"] / results["baseline"]["images_per_s"]) < 1e-9


def test_profile_convert_command(tmp_path: Path, capsys) -> None:
    folder = synthetic_images(tmp_path / "imgs", 3, seed=3)
    assert main(["profile", "convert", "--images", str(folder), "--workers", "1", "--max-side", "96", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"baseline"' in out and '"slipstream_workers_1"' in out
