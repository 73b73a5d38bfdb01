"""What zero-shot classification says to the text tower: class names and prompt templates."""
from __future__ import annotations

import re
from pathlib import Path

from evaluation.suite import suite_templates
from pipeline.eval_view import LabelledImages


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a text file, stripped: a class-name or template file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def default_classnames(n_classes: int) -> list[str]:
    """ImageNet's class names (CLIP's, which SLIP's suite uses too), from open_clip's zero-shot metadata."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if n_classes != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"the data has {n_classes} classes, not ImageNet's {len(IMAGENET_CLASSNAMES)}")
    return list(IMAGENET_CLASSNAMES)


def clip80_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, from open_clip's zero-shot metadata, with {} for the class."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def slip7_templates() -> list[str]:
    """The 7 ImageNet templates SLIP's paper reports zero-shot with (`itap of a {}.`, ...)."""
    return suite_templates("imagenet")


# The built-in template sets a `--templates` (or `eval.templates`) value may name instead of a file.
TEMPLATE_SETS = {"clip80": clip80_templates, "slip7": slip7_templates}


def templates_option(value: str) -> list[str]:
    """What a `--templates` value means: a built-in set by name (`clip80`, `slip7`), else a file of one
    template per line (write `./clip80` for a file of that name)."""
    if value in TEMPLATE_SETS:
        return TEMPLATE_SETS[value]()
    try:
        return read_lines(value)
    except FileNotFoundError:
        raise FileNotFoundError(f"{value}: no such file (nor a built-in template set: {', '.join(TEMPLATE_SETS)})") from None


def checked_templates(lines: list[str]) -> list[str]:
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise ValueError(f"a template must hold one '{{}}' for the class name, got {bad[0]!r}")
    return lines


def fill(template: str, name: str) -> str:
    # Not str.format: a template may hold other braces.
    return template.replace("{}", name)


# Files a zero-shot set may carry, in its folder or beside it (the demo dataset writes both).
CLASSNAMES_FILE, TEMPLATES_FILE = "classnames.txt", "templates.txt"
_WORDNET_ID = re.compile(r"n\d{8}")


def _carried(data: LabelledImages, name: str) -> Path | None:
    """`name` in the data's folder, else beside it."""
    for folder in (data.path, data.path.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def is_imagenet(data: LabelledImages) -> bool:
    """The classes are ImageNet's 1000 WordNet ids (n01440764, ...)."""
    return len(data.classes) == 1000 and all(_WORDNET_ID.fullmatch(c) for c in data.classes)


def readable(folder: str) -> str:
    """A class folder's name as a prompt says it: `coffee_mug` -> `coffee mug`."""
    return " ".join(folder.replace("_", " ").split())


def zeroshot_classnames(data: LabelledImages, given: list[str] | None) -> list[str]:
    """The class names prompts are made of, one per class of the data, in label order. The first of:
    `given` (`--classnames`, `eval.classnames`); the names a converted dataset recorded
    (`slip convert classes --classnames`); a `classnames.txt` in the data's folder, else beside it;
    ImageNet's names when the classes are ImageNet's 1000 WordNet ids (n01440764, ...); else the
    class folder names, underscores read as spaces."""
    if given:
        names, source = given, "the given class names"
    elif data.classnames:
        names, source = data.classnames, "the dataset's manifest"
    elif (path := _carried(data, CLASSNAMES_FILE)) is not None:
        names, source = read_lines(path), str(path)
    elif is_imagenet(data):
        names, source = default_classnames(len(data.classes)), "ImageNet's class names"
    else:
        names, source = [readable(c) for c in data.classes], "the folder names"
    if len(names) != len(data.classes):
        raise ValueError(f"{data.path}: {len(data.classes)} classes but {len(names)} class names (from {source})")
    return names


def zeroshot_templates(data: LabelledImages, given: list[str] | None) -> list[str]:
    """The prompt templates, by the same rule: `given` (`--templates`, `eval.templates`), else a
    `templates.txt` in the data's folder or beside it, else SLIP's 7 when the classes are ImageNet's
    WordNet ids (the paper's ImageNet figure), else CLIP's 80."""
    if given:
        return checked_templates(given)
    if (path := _carried(data, TEMPLATES_FILE)) is not None:
        return checked_templates(read_lines(path))
    return checked_templates(slip7_templates() if is_imagenet(data) else clip80_templates())
