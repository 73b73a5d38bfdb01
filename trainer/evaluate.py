"""`slip eval`: zero-shot classification, linear probe and retrieval of a trained or released model.

A checkpoint is any of: an exported `.safetensors` (`slip export`), a run directory (its
latest complete checkpoint), or a checkpoint released by the SLIP reference (`.pt`/`.pth`).
Images go through DALI's evaluation view (shorter side resized, center crop), in batches,
with a progress bar; features are L2-normalised in fp32.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.augment import AugmentConfig
from trainer.models.contrastive import ContrastiveModel


def load_eval_model(checkpoint: str | Path, *, image_size: int | None = None) -> tuple[ContrastiveModel, AugmentConfig]:
    """The model in eval mode and the evaluation view's settings (the training image size and normalisation)."""
    from trainer.export import latest_weights, load_model_and_config

    path = Path(checkpoint)
    if path.is_dir():
        path = latest_weights(path / "checkpoints")
    if path.suffix in (".pt", ".pth"):
        from trainer.slip_reference import load_reference_model

        model = load_reference_model(path, image_size=image_size)  # None: the size it was trained at
        return model.eval(), AugmentConfig(image_size=int(model.visual.patch_embed.img_size[0]))
    model, cfg = load_model_and_config(path)
    augment = cfg.augment if image_size is None else replace(cfg.augment, image_size=image_size)
    return model, augment


def dali_device(model: torch.nn.Module) -> dict:
    """Decode where the model runs: nvJPEG on its GPU, or DALI's CPU operators."""
    device = next(model.parameters()).device
    return {"device": "gpu", "device_id": device.index or 0} if device.type == "cuda" else {"device": "cpu"}


def _bar(iterable: Iterable, total: int, desc: str) -> Iterator:
    return iter(tqdm(iterable, total=total, desc=desc, unit="batch", disable=os.environ.get("CI") == "true"))


@torch.no_grad()
def image_features(model: ContrastiveModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, d] fp32 unit rows, the batches' second outputs concatenated [n])."""
    device = next(model.parameters()).device
    feats, keys = [], []
    for images, key in _bar(batches, total, desc):
        feats.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())  # (b, d)
        keys.append(key)
    return torch.cat(feats), torch.cat(keys)


@torch.no_grad()
def text_features(model: ContrastiveModel, tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """[n, d] fp32 unit rows for int64 tokens [n, 77]."""
    device = next(model.parameters()).device
    out = [F.normalize(model.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1).cpu()
           for i in range(0, len(tokens), batch_size)]  # fmt: skip
    return torch.cat(out) if out else torch.empty(0, 0)


def _needs_text(model: ContrastiveModel, what: str) -> None:
    if not model.parts.text:
        raise ValueError(f"{what} needs a text tower; this model was trained without one (SimCLR): use `slip eval linear`")


def default_prompts(n_classes: int) -> tuple[list[str], list[str]]:
    """ImageNet's class names and CLIP's 80 prompt templates, from open_clip's zero-shot metadata."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    if n_classes != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"the folder has {n_classes} classes, not ImageNet's {len(IMAGENET_CLASSNAMES)}: give --classnames and --templates")
    return list(IMAGENET_CLASSNAMES), [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]  # str.format templates


def _templates(lines: list[str]) -> list[str]:
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise ValueError(f"a template must hold one '{{}}' for the class name, got {bad[0]!r}")
    return lines


def eval_zeroshot(
    model: ContrastiveModel,
    augment: AugmentConfig,
    data: str | Path,
    *,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    batch_size: int = 256,
    threads: int = 2,
) -> dict[str, float]:
    from pipeline.evaluation import class_folders
    from trainer.zeroshot import zeroshot_accuracy

    _needs_text(model, "zero-shot classification")
    n = len(class_folders(data))
    if classnames is None or templates is None:
        default_names, default_templates = default_prompts(n)
        classnames = classnames or default_names
        templates = templates or default_templates
    return zeroshot_accuracy(model, data, classnames, _templates(templates), augment, batch_size=batch_size, threads=threads)


def _folder_features(model: ContrastiveModel, augment: AugmentConfig, folder: str | Path, batch_size: int, threads: int, desc: str):
    from pipeline.evaluation import count_images, iter_folder

    total = -(-count_images(folder) // batch_size)
    return image_features(model, iter_folder(folder, augment, batch_size=batch_size, threads=threads, **dali_device(model)), total, desc)


def eval_linear(
    model: ContrastiveModel,
    augment: AugmentConfig,
    train: str | Path,
    val: str | Path,
    *,
    batch_size: int = 256,
    threads: int = 2,
) -> dict:
    """Frozen image-tower features (before the projection heads, as SLIP's probe) and a logistic regression."""
    from pipeline.evaluation import class_folders
    from trainer.linear_probe import linear_probe

    if class_folders(train) != class_folders(val):
        raise ValueError(f"{train} and {val} have different class folders")
    tower = _TowerOnly(model)
    train_x, train_y = _folder_features(tower, augment, train, batch_size, threads, "linear probe: train features")
    val_x, val_y = _folder_features(tower, augment, val, batch_size, threads, "linear probe: val features")
    return linear_probe(train_x, train_y, val_x, val_y)


class _TowerOnly(torch.nn.Module):
    """encode_image as the vision tower's pooled feature: what a linear probe reads."""

    def __init__(self, model: ContrastiveModel) -> None:
        super().__init__()
        self.model = model
        self.parts = model.parts

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.visual(images)  # (b, vision_width)


def eval_retrieval(
    model: ContrastiveModel,
    augment: AugmentConfig,
    data: str | Path,
    *,
    batch_size: int = 256,
    threads: int = 2,
) -> dict:
    """Image-to-text and text-to-image recall@1/5/10 over every caption of a converted dataset."""
    from pipeline.evaluation import iter_beton
    from pipeline.reader import BetonDataset
    from trainer.retrieval import recall_at_k

    _needs_text(model, "retrieval")
    dataset = BetonDataset(data)
    total = -(-len(dataset) // batch_size)
    images, order = image_features(model, iter_beton(dataset, augment, batch_size=batch_size, threads=threads, **dali_device(model)), total, "retrieval: images")
    position = torch.empty(len(dataset), dtype=torch.int64)
    position[order] = torch.arange(len(order))
    rows, owner = [], []
    for i in range(len(dataset)):
        k = int(dataset.n_captions[i])
        rows.append(torch.from_numpy(dataset.tokens(i)[:k].astype("int64")))  # (k, 77)
        owner += [int(position[i])] * k
    texts = text_features(model, torch.cat(rows), batch_size=batch_size)
    return recall_at_k(images, texts, torch.tensor(owner, dtype=torch.int64))


EVALS: dict[str, Callable] = {"zeroshot": eval_zeroshot, "linear": eval_linear, "retrieval": eval_retrieval}
