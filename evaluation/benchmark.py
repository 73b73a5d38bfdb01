"""SLIP's zero-shot suite over a root of datasets: each with its own class names, templates and metric.

ROOT/<name>/ for each of the suite's dataset names (`suite_names()`) is a class-per-folder tree or a
labelled dataset from `slip convert classes`; a name with no such sub-directory is reported missing.
How the data's classes map onto the suite's (`suite_labels`): by name when every class's name (the
names a converted dataset recorded, else the folder name with _ as spaces) is one of the suite's
names for that dataset, case aside; else by position, the i-th class in sorted folder order being
the i-th of SLIP's labels.json (how SLIP itself read these datasets: ImageNet's WordNet ids, folders
numbered 000..N-1, country211's ISO codes, all sort into that order); folders numbered 0..N-1
without padding are read as their numbers. Any other mismatch fails that
dataset in one line; the others still run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from evaluation.encoder import Encoder
from evaluation.features import require_images
from evaluation.metrics import metric
from evaluation.prompts import readable
from evaluation.suite import ClassName, suite_classnames, suite_metric, suite_names, suite_templates
from evaluation.zeroshot import zeroshot_logits
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import LabelledImages, Skipped, labelled_images
from pipeline.schema import MANIFEST


def _key(name: str) -> str:
    return readable(name).casefold()


def suite_labels(dataset: str, data: LabelledImages) -> list[int]:
    """For each of the data's classes (label order), its index among the suite's classes for `dataset`."""
    suite = suite_classnames(dataset)
    index: dict[str, int] = {}
    for i, name in enumerate(suite):
        for synonym in [name] if isinstance(name, str) else name:
            index.setdefault(_key(synonym), i)
    for names in (data.classnames, data.classes):
        by_name = [index.get(_key(n)) for n in names or []]
        if by_name and None not in by_name and len(set(by_name)) == len(by_name) == len(suite):
            return by_name  # type: ignore[return-value]
    if sorted(data.classes, key=lambda c: int(c) if c.isdecimal() else -1) == [str(i) for i in range(len(suite))]:
        # Folders numbered 0..N-1 without padding sort as text ("10" before "2"); the number is the class.
        return [int(c) for c in data.classes]
    if len(data.classes) != len(suite):
        raise ValueError(f"{data.path}: {len(data.classes)} classes, but SLIP's {dataset} has {len(suite)} "
                         f"(name the class folders by its class names, or give exactly {len(suite)} in its label order)")  # fmt: skip
    return list(range(len(suite)))


def _labelled(path: Path) -> bool:
    """A sub-directory that holds a dataset: a converted one, or class folders."""
    return (path / MANIFEST).is_file() or (path.is_dir() and any(p.is_dir() for p in path.iterdir()))


def eval_dataset(encoder: Encoder, augment: AugmentConfig, dataset: str, path: str | Path, *, batch_size: int = 256, threads: int = 2) -> dict:
    """One suite dataset at `path`: its metric's value (a fraction in 0..1), the images scored, and the skipped."""
    data = labelled_images(path)
    remap = torch.tensor(suite_labels(dataset, data))
    classnames: list[ClassName] = suite_classnames(dataset)
    logits, labels, skipped = [], [], Skipped()
    for lg, lb in zeroshot_logits(encoder, augment, data, classnames, suite_templates(dataset), batch_size=batch_size, threads=threads, skipped=skipped):
        logits.append(lg)
        labels.append(remap[lb.long()])
    n = sum(len(lb) for lb in labels)
    require_images(n, data.path, skipped)
    name = suite_metric(dataset)
    value = metric(name, torch.cat(logits), torch.cat(labels))
    return {"metric": name, "value": value, "images": n, "classes": len(classnames), **skipped.report()}


def eval_suite(encoder: Encoder, augment: AugmentConfig, root: str | Path, *, batch_size: int = 256, threads: int = 2) -> dict:
    """Every suite dataset found under `root`, in SLIP's order. Each row has "dataset" and "status":
    "ok" (with its metric, value, images, skipped), "missing" (no ROOT/<name>/), or "failed" (with
    the one-line "error"). "mean" is over the datasets that ran (None when none did)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (--root holds one sub-directory per suite dataset)")
    rows = []
    for dataset in suite_names():
        path = root / dataset
        if not _labelled(path):
            rows.append({"dataset": dataset, "status": "missing", "metric": suite_metric(dataset)})
            continue
        try:
            r = eval_dataset(encoder, augment, dataset, path, batch_size=batch_size, threads=threads)
        except (ValueError, OSError) as err:
            rows.append({"dataset": dataset, "status": "failed", "metric": suite_metric(dataset), "error": str(err)})
            continue
        rows.append({"dataset": dataset, "status": "ok", **r})
    values = [r["value"] for r in rows if r["status"] == "ok"]
    return {
        "benchmark": "slip",
        "root": str(root),
        "datasets": rows,
        "mean": sum(values) / len(values) if values else None,
        "present": len(values),
        "failed": sum(r["status"] == "failed" for r in rows),
        "missing": sum(r["status"] == "missing" for r in rows),
    }
