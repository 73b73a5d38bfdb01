"""SLIP's zero-shot suite as data: per dataset, its class names in label order and its prompt templates.

The facts live in `slip_suite.json` beside this module (shipped in the wheel), taken from
github.com/facebookresearch/SLIP's labels.json and templates.json (its "about" says which commit).
A class is one name or a list of synonyms (fer2013's "happy"/"smiling"), whose prompts are averaged.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

SUITE_FILE = Path(__file__).with_name("slip_suite.json")

# The paper's metric per dataset (SLIP's eval_zeroshot.py); every other dataset reports top-1.
METRICS = {
    "aircraft": "mean_per_class",
    "pets": "mean_per_class",
    "caltech101": "mean_per_class",
    "flowers": "mean_per_class",
    "kinetics700_frames": "top1_top5_mean",
    "hateful_memes": "roc_auc",
}

ClassName = str | list[str]


@functools.cache
def _suite() -> dict[str, dict]:
    return json.loads(SUITE_FILE.read_text(encoding="utf-8"))["datasets"]


def suite_names() -> list[str]:
    """The suite's 28 dataset names, in SLIP's order."""
    return list(_suite())


def suite_classnames(dataset: str) -> list[ClassName]:
    """`dataset`'s class names in SLIP's label order (a list where a class has synonyms)."""
    return [c if isinstance(c, str) else list(c) for c in _entry(dataset)["classnames"]]


def suite_templates(dataset: str) -> list[str]:
    return list(_entry(dataset)["templates"])


def suite_metric(dataset: str) -> str:
    _entry(dataset)
    return METRICS.get(dataset, "top1")


def _entry(dataset: str) -> dict:
    try:
        return _suite()[dataset]
    except KeyError:
        raise ValueError(f"{dataset!r} is not in SLIP's zero-shot suite (one of: {', '.join(_suite())})") from None
