"""The embedded shapes dataset: deterministic, laid out as the converter and evaluator expect,
captions true of their images, generated atomically and reused only when complete."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import demo_dataset as shapes
from pipeline.demo_dataset import COLOURS, SHAPES, TEMPLATES, ShapesSpec, generate

SMALL = ShapesSpec(seed=3, train_size=40, zeroshot_per_class=2)
RELATION = re.compile(
    r"(\w+) (\w+) (to the left of|to the right of|above|below) an? (?:small |large )?(\w+) (\w+)"
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)  # (h, w, 3)


def _object_pixels(image: np.ndarray) -> np.ndarray:
    """(h, w) bool: the saturated pixels, which only objects have (backgrounds are near grey)."""
    return image.max(axis=2) - image.min(axis=2) > 80


def _nearest_colours(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) names of the nearest of COLOURS."""
    palette = np.array([shapes._RGB[c] for c in COLOURS], dtype=np.float64)  # (6, 3)
    return np.array(COLOURS)[np.argmin(((rgb[..., None, :] - palette) ** 2).sum(axis=-1), axis=-1)]


def _nearest_colour(rgb: np.ndarray) -> str:
    return str(_nearest_colours(rgb))


def _words(caption: str, vocabulary: tuple[str, ...]) -> list[str]:
    return [w for w in re.findall(r"\w+", caption) if w in vocabulary]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("shapes") / "data", ShapesSpec(seed=1, train_size=200,
                                                                           zeroshot_per_class=2))


def _single_object_samples(root: Path) -> list[tuple[Path, list[str]]]:
    samples = []
    for txt in sorted((root / "train").glob("*.txt")):
        captions = txt.read_text(encoding="utf-8").splitlines()
        if all(len(_words(c, SHAPES)) == 1 for c in captions):
            samples.append((txt.with_suffix(".jpg"), captions))
    return samples


def test_same_spec_gives_identical_bytes_and_seed_changes_images(tmp_path: Path) -> None:
    first = _files(generate(tmp_path / "a", SMALL, progress=False))
    assert first == _files(generate(tmp_path / "b", SMALL, progress=False))

    other = _files(generate(tmp_path / "c", ShapesSpec(seed=4, train_size=40, zeroshot_per_class=2)))
    train = [name for name in first if name.startswith("train/") and name.endswith(".jpg")]
    assert sum(first[name] != other[name] for name in train) == len(train)


def test_smaller_train_size_is_a_prefix(tmp_path: Path) -> None:
    # each image has its own random stream, so growing the dataset keeps earlier samples
    small = _files(generate(tmp_path / "small", ShapesSpec(seed=3, train_size=10, zeroshot_per_class=2)))
    large = _files(generate(tmp_path / "large", SMALL))
    assert all(large[name] == data for name, data in small.items() if name.startswith(("train/", "zeroshot/")))


def test_layout(tmp_path: Path) -> None:
    root = generate(tmp_path / "data", SMALL, progress=False)
    train = root / "train"
    assert sorted(p.name for p in train.glob("*.jpg")) == [f"{i:06d}.jpg" for i in range(SMALL.train_size)]
    assert sorted(p.name for p in train.glob("*.txt")) == [f"{i:06d}.txt" for i in range(SMALL.train_size)]
    for txt in train.glob("*.txt"):
        text = txt.read_text(encoding="utf-8")
        assert text.endswith("\n")
        captions = text.splitlines()
        assert len(captions) == SMALL.captions_per_image == len(set(captions))
        for caption in captions:
            assert caption.strip() and _words(caption, COLOURS) and _words(caption, SHAPES), caption

    folders = sorted(p.name for p in (root / "zeroshot").iterdir())
    assert folders == sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
    for folder in folders:
        images = sorted(p.name for p in (root / "zeroshot" / folder).iterdir())
        assert images == [f"{i:04d}.jpg" for i in range(SMALL.zeroshot_per_class)]
    classnames = (root / "classnames.txt").read_text(encoding="utf-8").splitlines()
    assert classnames == [folder.replace("_", " ") for folder in folders]
    assert (root / "templates.txt").read_text(encoding="utf-8").splitlines() == list(TEMPLATES)
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert json.loads((root / "spec.json").read_text()) == {
        "seed": 3, "train_size": 40, "zeroshot_per_class": 2, "image_size": 64, "captions_per_image": 4, "format": 1
    }

    for path in [*train.glob("*.jpg"), *(root / "zeroshot").rglob("*.jpg")]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_single_object_caption_names_the_drawn_colour_and_place(dataset: Path) -> None:
    samples = _single_object_samples(dataset)
    assert len(samples) > 60  # about half of 200
    for jpg, captions in samples:
        image = _pixels(jpg)
        mask = _object_pixels(image)
        named = {w for c in captions for w in _words(c, COLOURS)}
        assert named == {_nearest_colour(np.median(image[mask], axis=0))}, (jpg, captions)
        ys, xs = np.nonzero(mask)
        for caption in captions:
            if "left" in caption:
                assert xs.mean() < 32, (jpg, caption)
            if "right" in caption:
                assert xs.mean() > 32, (jpg, caption)
            if "top" in caption:
                assert ys.mean() < 32, (jpg, caption)
            if "bottom" in caption:
                assert ys.mean() > 32, (jpg, caption)


def test_zeroshot_images_show_their_class_colour(dataset: Path) -> None:
    for jpg in (dataset / "zeroshot").rglob("*.jpg"):
        image = _pixels(jpg)
        colour = jpg.parent.name.split("_")[0]
        assert _nearest_colour(np.median(image[_object_pixels(image)], axis=0)) == colour, jpg


def test_two_object_relations_are_true(dataset: Path) -> None:
    checked = 0
    for txt in sorted((dataset / "train").glob("*.txt")):
        for caption in txt.read_text(encoding="utf-8").splitlines():
            match = RELATION.search(caption)
            if match is None or match[1] == match[4]:
                continue  # same colour twice: pixels cannot tell the objects apart
            image = _pixels(txt.with_suffix(".jpg"))
            mask = _object_pixels(image)
            nearest = _nearest_colours(image[mask])
            ys, xs = np.nonzero(mask)
            first = np.array([xs[nearest == match[1]].mean(), ys[nearest == match[1]].mean()])
            second = np.array([xs[nearest == match[4]].mean(), ys[nearest == match[4]].mean()])
            axis, sign = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}[
                match[3]
            ]
            assert sign * (second[axis] - first[axis]) > 4, (txt, caption)
            checked += 1
    assert checked > 30


def test_reuse_keeps_files_and_changed_spec_regenerates(tmp_path: Path) -> None:
    root = generate(tmp_path / "data", SMALL, progress=False)
    before = _mtimes(root)
    assert generate(root, SMALL, progress=False) == root
    assert _mtimes(root) == before

    changed = ShapesSpec(seed=4, train_size=40, zeroshot_per_class=2)
    generate(root, changed, progress=False)
    assert json.loads((root / "spec.json").read_text())["seed"] == 4
    assert _files(root) == _files(generate(tmp_path / "fresh", changed, progress=False))


def test_leftovers_of_an_interrupted_run_are_replaced(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "000000.jpg").write_bytes(b"half written")
    stale = tmp_path / ".data.tmp-999999"
    stale.mkdir()
    (stale / "junk").write_text("junk")

    generate(root, SMALL, progress=False)
    assert _files(root) == _files(generate(tmp_path / "fresh", SMALL, progress=False))
    assert not stale.exists()


def test_a_failing_run_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    save = shapes._save_jpeg

    def failing_save(image: Image.Image, path: Path) -> None:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt
        save(image, path)

    monkeypatch.setattr(shapes, "_save_jpeg", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", SMALL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock"]


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        generate(tmp_path, SMALL, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "bad", [dict(captions_per_image=0), dict(captions_per_image=11), dict(image_size=16), dict(seed=-1),
            dict(zeroshot_per_class=0), dict(train_size=-1)]
)
def test_spec_rejects_unusable_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        ShapesSpec(**bad)


def test_other_image_sizes_keep_objects_inside(tmp_path: Path) -> None:
    for size in (32, 33, 97):
        root = generate(tmp_path / str(size), ShapesSpec(train_size=30, zeroshot_per_class=1, image_size=size))
        for jpg in (root / "train").glob("*.jpg"):
            mask = _object_pixels(_pixels(jpg))
            assert mask.any() and not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), jpg
    assert os.environ.get("CI") == "true"  # set by conftest: no progress bars in test logs
