"""Zero-shot classification: class prompts through the text tower, images through the image tower."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.encoder import Encoder, batch_bar, dali_device, encoder_device, eval_mode
from evaluation.features import require_images, require_text
from evaluation.prompts import fill, zeroshot_classnames, zeroshot_templates
from evaluation.suite import ClassName
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import LabelledImages, Skipped, labelled_images
from pipeline.text import tokenize


@torch.no_grad()
def class_embeddings(encoder: Encoder, classnames: list[ClassName], templates: list[str], device: torch.device) -> torch.Tensor:
    """[C, d]: per class, the mean of its L2-normalised prompt embeddings, renormalised (CLIP's ensemble).
    A class given as a list of synonyms averages the prompts of every template with every synonym."""
    rows = []
    for name in classnames:
        synonyms = [name] if isinstance(name, str) else name
        tokens = torch.from_numpy(tokenize([fill(t, s) for t in templates for s in synonyms]).astype("int64")).to(device)  # (T*S, 77)
        emb = F.normalize(encoder.encode_text(tokens).float(), dim=-1).mean(dim=0)  # (d,)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows)  # (C, d)


@torch.no_grad()
def zeroshot_logits(
    encoder: Encoder,
    augment: AugmentConfig,
    data: LabelledImages,
    classnames: list[ClassName],
    templates: list[str],
    *,
    batch_size: int = 256,
    threads: int = 2,
    skipped: Skipped,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of decodable images: cosine similarities to each class [b, C] (classes in the order
    of `classnames`) and the data's labels [b], both on the CPU. Undecodable images go to `skipped`."""
    require_text(encoder, "zero-shot classification")
    device = encoder_device(encoder)
    with eval_mode(encoder):
        classes = class_embeddings(encoder, classnames, templates, device)  # first: a text-less model fails before any decode
        batches = data.batches(augment, batch_size=batch_size, threads=threads, skipped=skipped, **dali_device(encoder))
        for images, labels in batch_bar(batches, -(-data.n_images // batch_size), f"zero-shot {data.path.name}"):
            feats = F.normalize(encoder.encode_image(images.to(device)).float(), dim=-1)  # (b, d)
            yield (feats @ classes.T).cpu(), labels.cpu()


@torch.no_grad()
def eval_zeroshot(
    encoder: Encoder,
    augment: AugmentConfig,
    data: str | Path | LabelledImages,
    *,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    batch_size: int = 256,
    threads: int = 2,
) -> dict:
    """Top-1 and top-5 (fractions in 0..1) over every decodable image of a class-per-folder tree or
    a labelled converted dataset; "skipped" counts the others by reason (`Skipped.report`). `classnames` and
    `templates` None: as `zeroshot_classnames` and `zeroshot_templates` pick them."""
    require_text(encoder, "zero-shot classification")
    data = data if isinstance(data, LabelledImages) else labelled_images(data)
    templates = zeroshot_templates(data, templates)
    classnames = zeroshot_classnames(data, classnames)
    k = min(5, len(classnames))
    top1 = top5 = total = 0
    skipped = Skipped()
    for logits, labels in zeroshot_logits(encoder, augment, data, classnames, templates, batch_size=batch_size, threads=threads, skipped=skipped):
        hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (b, k)
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=-1).sum())
        total += len(labels)
    require_images(total, data.path, skipped)
    return {"top1": top1 / total, "top5": top5 / total, "images": total, "classes": len(classnames), **skipped.report()}
