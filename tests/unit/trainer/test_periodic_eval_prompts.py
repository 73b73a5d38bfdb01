"""In-training zero-shot resolves its prompts by evaluation's one rule, before the first step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.config import load_config
from trainer.periodic_eval import PeriodicEval


def _tree(root: Path, classes: list[str]) -> Path:
    rng = np.random.default_rng(7)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    return root


def _eval(data: Path, *extra: str) -> PeriodicEval:
    cfg = load_config("tiny_cpu", ["eval.every_epochs=1", f"eval.zeroshot={data}", *extra])
    return PeriodicEval(cfg, steps_per_epoch=2, total_steps=4, is_main=True)


def test_folder_names_and_carried_templates_are_resolved_at_start(tmp_path: Path) -> None:
    data = _tree(tmp_path / "zs", ["coffee_mug", "golden_retriever"])
    (data / "templates.txt").write_text("a photo of a {}.\nart of the {}.\n")
    ev = _eval(data)
    assert ev.classnames == ["coffee mug", "golden retriever"]
    assert ev.templates == ["a photo of a {}.", "art of the {}."]


def test_a_bad_carried_template_fails_before_training_not_epochs_in(tmp_path: Path) -> None:
    data = _tree(tmp_path / "zs", ["cat", "dog"])
    (data / "templates.txt").write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(ValueError, match="eval.zeroshot: a template must hold one"):
        _eval(data)


def test_a_built_in_template_set_is_named_as_on_the_command_line(tmp_path: Path) -> None:
    from evaluation.prompts import TEMPLATE_SETS

    ev = _eval(_tree(tmp_path / "zs", ["cat", "dog"]), "eval.templates=slip7")
    assert ev.templates == TEMPLATE_SETS["slip7"]() and len(ev.templates) == 7
