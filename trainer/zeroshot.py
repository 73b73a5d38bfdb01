"""Zero-shot classification: class prompts through the text tower, images through the image tower."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.augment import AugmentConfig
from pipeline.evaluation import LabelledImages, labelled_images
from pipeline.text import tokenize
from trainer.eval_runtime import batch_bar, dali_device, eval_mode
from trainer.models.contrastive import ContrastiveModel


def read_lines(path: str | Path) -> list[str]:
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
    """CLIP's 80 ImageNet prompt templates, from open_clip's zero-shot metadata, as str.format templates."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def zeroshot_classnames(data: LabelledImages, given: list[str] | None) -> list[str]:
    """The names prompts are made of: `given`, else those a labelled .beton recorded (a folder
    records none), else ImageNet's; one per class of the data."""
    names = given or data.classnames or default_classnames(len(data.classes))
    if len(names) != len(data.classes):
        raise ValueError(f"{data.path}: {len(data.classes)} classes but {len(names)} class names")
    return names


@torch.no_grad()
def class_embeddings(model: ContrastiveModel, classnames: list[str], templates: list[str], device: torch.device) -> torch.Tensor:
    """[C, d]: per class, the mean of its L2-normalised prompt embeddings, renormalised (CLIP's ensemble)."""
    rows = []
    for name in classnames:
        prompts = [t.replace("{}", name) for t in templates]  # not str.format: a template may hold other braces
        tokens = torch.from_numpy(tokenize(prompts).astype("int64")).to(device)  # (T, 77)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(dim=0)  # (d,)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows)  # (C, d)


@torch.no_grad()
def zeroshot_accuracy(
    model: ContrastiveModel,
    source: str | Path | LabelledImages,
    classnames: list[str] | None,
    templates: list[str],
    augment: AugmentConfig,
    *,
    batch_size: int = 256,
    threads: int = 2,
) -> dict[str, float]:
    """Top-1 and top-5 (fractions in 0..1) over every image of a class-per-folder tree or a
    labelled converted dataset; `classnames` None: as `zeroshot_classnames` picks them."""
    data = source if isinstance(source, LabelledImages) else labelled_images(source)
    classnames = zeroshot_classnames(data, classnames)
    device = next(model.parameters()).device
    k = min(5, len(classnames))
    top1 = top5 = total = 0
    with eval_mode(model):
        classes = class_embeddings(model, classnames, templates, device)
        batches = data.batches(augment, batch_size=batch_size, threads=threads, **dali_device(model))
        for images, labels in batch_bar(batches, -(-data.n_images // batch_size), "zero-shot"):
            feats = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)  # (b, d)
            ranked = (feats @ classes.T).topk(k, dim=-1).indices.cpu()  # (b, k)
            hits = ranked == labels[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=-1).sum())
            total += len(labels)
    return {"top1": top1 / total, "top5": top5 / total, "images": total, "classes": len(classnames)}
