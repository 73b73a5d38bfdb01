"""`slip eval`: zero-shot classification, linear probe and retrieval of a trained or released model.

A checkpoint is any of: an exported `.safetensors` (`slip export`), a run directory (its
latest complete checkpoint), or a checkpoint released by the SLIP reference (`.pt`/`.pth`).
Images go through DALI's evaluation view (shorter side resized, center crop), in batches,
with a progress bar; features are L2-normalised in fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from pipeline.augment import AugmentConfig
from trainer.eval_runtime import batch_bar, dali_device, eval_mode
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
    if image_size is not None and image_size != cfg.augment.image_size:
        # Its ViT's position embedding is fixed to the training grid; SLIP's releases are resampled on load.
        raise ValueError(f"{path}: --image-size {image_size}: this model was trained at {cfg.augment.image_size} px and evaluates at that size")
    return model, cfg.augment


@torch.no_grad()
def image_features(model: ContrastiveModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, d] fp32 unit rows, the batches' second outputs concatenated [n])."""
    device = next(model.parameters()).device
    feats, keys = [], []
    with eval_mode(model):
        for images, key in batch_bar(batches, total, desc):
            feats.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1))  # (b, d), on the model's device
            keys.append(key)
    return torch.cat(feats), torch.cat(keys)


@torch.no_grad()
def text_features(model: ContrastiveModel, tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """[n, d] fp32 unit rows for int64 tokens [n, 77]."""
    device = next(model.parameters()).device
    with eval_mode(model):
        out = [F.normalize(model.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1)
               for i in range(0, len(tokens), batch_size)]  # fmt: skip
    return torch.cat(out) if out else torch.empty(0, 0)


def _needs_text(model: ContrastiveModel, what: str) -> None:
    if not model.parts.text:
        raise ValueError(f"{what} needs a text tower; this model was trained without one (SimCLR): use `slip eval linear`")


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
    from trainer.zeroshot import default_templates, zeroshot_accuracy

    _needs_text(model, "zero-shot classification")
    templates = _templates(templates or default_templates())
    return zeroshot_accuracy(model, data, classnames, templates, augment, batch_size=batch_size, threads=threads)


def _labelled_features(model: ContrastiveModel, augment: AugmentConfig, data, batch_size: int, threads: int, desc: str):
    batches = data.batches(augment, batch_size=batch_size, threads=threads, **dali_device(model))
    return image_features(model, batches, -(-data.n_images // batch_size), desc)


def eval_linear(
    model: ContrastiveModel,
    augment: AugmentConfig,
    train: str | Path,
    val: str | Path,
    *,
    batch_size: int = 256,
    threads: int = 2,
    l2_grid: list[float] | None = None,
) -> dict:
    """Frozen image-tower features (before the projection heads, as SLIP's probe) and a logistic regression."""
    from pipeline.evaluation import labelled_images
    from trainer.linear_probe import linear_probe

    train_set, val_set = labelled_images(train), labelled_images(val)
    if train_set.classes != val_set.classes:
        raise ValueError(f"{train} and {val} have different classes")
    tower = _TowerOnly(model)
    train_x, train_y = _labelled_features(tower, augment, train_set, batch_size, threads, "linear probe: train features")
    val_x, val_y = _labelled_features(tower, augment, val_set, batch_size, threads, "linear probe: val features")
    return linear_probe(train_x, train_y, val_x, val_y, l2_grid=l2_grid, n_classes=len(train_set.classes))


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


