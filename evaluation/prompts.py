"""What zero-shot classification says to the text tower: class names and prompt templates."""
from __future__ import annotations

from pathlib import Path

from pipeline.eval_view import LabelledImages


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a text file, stripped: a class-name or template file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def default_classnames(n_classes: int) -> list[str]:
    """ImageNet's class names, from open_clip's zero-shot metadata."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if n_classes != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"the data has {n_classes} classes, not ImageNet's {len(IMAGENET_CLASSNAMES)}: give --classnames")
    return list(IMAGENET_CLASSNAMES)


def default_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, from open_clip's zero-shot metadata, with {} for the class."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def checked_templates(lines: list[str]) -> list[str]:
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise ValueError(f"a template must hold one '{{}}' for the class name, got {bad[0]!r}")
    return lines


def fill(template: str, name: str) -> str:
    # Not str.format: a template may hold other braces.
    return template.replace("{}", name)


def zeroshot_classnames(data: LabelledImages, given: list[str] | None) -> list[str]:
    """The names prompts are made of: `given`, else those a labelled .beton recorded (a folder
    records none), else ImageNet's; one per class of the data."""
    names = given or data.classnames or default_classnames(len(data.classes))
    if len(names) != len(data.classes):
        raise ValueError(f"{data.path}: {len(data.classes)} classes but {len(names)} class names")
    return names
