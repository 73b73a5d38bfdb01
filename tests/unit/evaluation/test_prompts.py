"""The one rule for zero-shot class names and templates, shared by `slip eval` and in-training evaluation."""
from pathlib import Path

import pytest

from evaluation.prompts import zeroshot_classnames, zeroshot_templates
from pipeline.eval_view import LabelledImages


def _data(tmp_path: Path, classes: list[str], recorded: list[str] | None = None) -> LabelledImages:
    root = tmp_path / "data" / "val"
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    return LabelledImages(root, classes, recorded, 0)


def test_the_folder_names_are_the_default_with_underscores_read_as_spaces(tmp_path: Path) -> None:
    data = _data(tmp_path, ["cat", "coffee_mug", "golden__retriever"])
    assert zeroshot_classnames(data, None) == ["cat", "coffee mug", "golden retriever"]


def test_the_rule_in_order(tmp_path: Path) -> None:
    data = _data(tmp_path, ["a", "b"])
    (data.path.parent / "classnames.txt").write_text("beside a\nbeside b\n")
    assert zeroshot_classnames(data, None) == ["beside a", "beside b"]  # beside the folder (the demo's layout)
    (data.path / "classnames.txt").write_text("inside a\n\ninside b\n")
    assert zeroshot_classnames(data, None) == ["inside a", "inside b"]  # in the folder wins over beside it
    recorded = _data(tmp_path, ["a", "b"], ["recorded a", "recorded b"])
    assert zeroshot_classnames(recorded, None) == ["recorded a", "recorded b"]  # a converted dataset's own names
    assert zeroshot_classnames(recorded, ["given a", "given b"]) == ["given a", "given b"]  # --classnames first
    with pytest.raises(ValueError, match=r"2 classes but 3 class names \(from the given class names\)"):
        zeroshot_classnames(data, ["x", "y", "z"])
    (data.path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ValueError, match=r"2 classes but 1 class names \(from .*classnames.txt\)"):
        zeroshot_classnames(data, None)


def test_imagenet_wordnet_folders_get_imagenet_names(tmp_path: Path) -> None:
    classes = [f"n{i:08d}" for i in range(1000)]
    data = LabelledImages(tmp_path / "imagenet", classes, None, 0)
    names = zeroshot_classnames(data, None)
    assert len(names) == 1000 and names[0] != classes[0] and "n00000000" not in names
    data = LabelledImages(tmp_path / "subset", classes[:100], None, 0)  # not ImageNet's 1000: the folder names
    assert zeroshot_classnames(data, None) == classes[:100]


def test_templates_follow_the_same_rule(tmp_path: Path) -> None:
    data = _data(tmp_path, ["a", "b"])
    assert len(zeroshot_templates(data, None)) == 80  # CLIP's
    (data.path.parent / "templates.txt").write_text("a {}.\nthe {} here.\n")
    assert zeroshot_templates(data, None) == ["a {}.", "the {} here."]
    assert zeroshot_templates(data, ["x {}"]) == ["x {}"]
    with pytest.raises(ValueError, match="one '{}'"):
        zeroshot_templates(data, ["no slot"])
