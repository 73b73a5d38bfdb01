"""SLIP's suite as shipped data, the ImageNet template default, the named template sets, and how a
dataset's classes map onto the suite's."""
from pathlib import Path

import pytest

from evaluation.benchmark import suite_labels
from evaluation.prompts import templates_option, zeroshot_templates
from evaluation.suite import SUITE_FILE, suite_classnames, suite_metric, suite_names, suite_templates
from pipeline.eval_view import LabelledImages

SLIP7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
NAMES = ("food101 cifar10 cifar100 birdsnap cub200 imagenet rendered_sst2 hateful_memes clevr_counts kinetics700_frames ucf101_frames "
         "patch_camelyon country211 kitti_distance gtsrb resisc45 eurosat stl10 fer2013 mnist flowers caltech101 pets dtd voc2007 aircraft cars sun397").split()  # fmt: skip


def test_the_suite_holds_slips_28_datasets_with_their_facts() -> None:
    assert suite_names() == NAMES
    sizes = {"imagenet": 1000, "cifar100": 100, "hateful_memes": 2, "kinetics700_frames": 700, "country211": 211, "flowers": 102, "fer2013": 7}
    assert {d: len(suite_classnames(d)) for d in sizes} == sizes
    assert suite_templates("imagenet") == SLIP7
    assert all(t.count("{}") == 1 for d in NAMES for t in suite_templates(d))
    assert suite_classnames("hateful_memes")[1] == "hatespeech meme"
    assert ["happy", "smiling"] in suite_classnames("fer2013")  # a class of synonyms
    metrics = {d: suite_metric(d) for d in NAMES}
    assert {d for d, m in metrics.items() if m == "mean_per_class"} == {"aircraft", "pets", "caltech101", "flowers"}
    assert metrics["kinetics700_frames"] == "top1_top5_mean" and metrics["hateful_memes"] == "roc_auc" and metrics["cifar10"] == "top1"
    with pytest.raises(ValueError, match="'imagenet21k' is not in SLIP's zero-shot suite"):
        suite_metric("imagenet21k")
    assert "facebookresearch/SLIP" in SUITE_FILE.read_text()
    assert 'evaluation = ["slip_suite.json"]' in (Path(__file__).parents[3] / "pyproject.toml").read_text()  # shipped in the wheel


def test_imagenet_defaults_to_slips_7_templates_and_clip80_stays_available(tmp_path: Path) -> None:
    wnids = [f"n{i:08d}" for i in range(1000)]
    imagenet = LabelledImages(tmp_path / "val", wnids, None, 0)
    assert zeroshot_templates(imagenet, None) == SLIP7
    other = LabelledImages(tmp_path / "val", wnids[:10], None, 0)
    assert len(zeroshot_templates(other, None)) == 80  # not ImageNet: CLIP's 80 as before
    assert len(zeroshot_templates(imagenet, templates_option("clip80"))) == 80
    assert templates_option("slip7") == SLIP7
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "templates.txt").write_text("a {} here.\n")
    assert zeroshot_templates(imagenet, None) == ["a {} here."]  # a carried file still wins over the default
    mine = tmp_path / "mine.txt"
    mine.write_text("one {}.\ntwo {}.\n")
    assert templates_option(str(mine)) == ["one {}.", "two {}."]
    with pytest.raises(FileNotFoundError, match=r"clip81: no such file \(nor a built-in template set: clip80, slip7\)"):
        templates_option("clip81")


def test_classes_map_onto_the_suite_by_name_else_by_position(tmp_path: Path) -> None:
    eurosat = [n if isinstance(n, str) else n[0] for n in suite_classnames("eurosat")]
    folders = sorted(n.replace(" ", "_").title() for n in eurosat)  # other case and order than the suite's
    by_name = suite_labels("eurosat", LabelledImages(tmp_path, folders, None, 0))
    assert [eurosat[i] for i in by_name] == [f.replace("_", " ").lower() for f in folders]
    numbered = [f"{i:03d}" for i in range(10)]
    assert suite_labels("eurosat", LabelledImages(tmp_path, numbered, None, 0)) == list(range(10))
    recorded = LabelledImages(tmp_path, numbered, list(reversed(eurosat)), 0)  # names a converted dataset recorded
    assert suite_labels("eurosat", recorded) == list(reversed(range(10)))
    fer = suite_labels("fer2013", LabelledImages(tmp_path, ["angry", "disgusted", "fearful", "smiling", "bored", "sad", "surprised"], None, 0))
    assert fer == list(range(7))  # a synonym names its class
    with pytest.raises(ValueError, match=r"4 classes, but SLIP's eurosat has 10"):
        suite_labels("eurosat", LabelledImages(tmp_path, numbered[:4], None, 0))


def test_unpadded_numbered_folders_are_read_as_their_numbers(tmp_path: Path) -> None:
    folders = sorted(str(i) for i in range(43))  # as the tree lists them: "0", "1", "10", "11", ...
    assert folders[2] == "10"
    assert suite_labels("gtsrb", LabelledImages(tmp_path, folders, None, 0)) == [int(f) for f in folders]
