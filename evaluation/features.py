"""Features for evaluation: images through an encoder in batches, captions through its text tower.

Features are L2-normalised in fp32, on the encoder's device.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.encoder import Encoder, ImageEncoder, batch_bar, encoder_device, eval_mode
from pipeline.eval_view import Skipped


def require_text(encoder: object, what: str) -> None:
    """Before any decode: an encoder without `encode_text`, or one whose `has_text` is False, has no text tower."""
    if not callable(getattr(encoder, "encode_text", None)) or not getattr(encoder, "has_text", True):
        raise ValueError(f"{what} needs a text tower; this model has none (SimCLR): use `slip eval linear`")


@torch.no_grad()
def image_features(encoder: ImageEncoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, d] fp32 unit rows, the batches' second outputs concatenated [n])."""
    device = encoder_device(encoder)
    feats, keys = [], []
    with eval_mode(encoder):
        for images, key in batch_bar(batches, total, desc):
            feats.append(F.normalize(encoder.encode_image(images.to(device)).float(), dim=-1))  # (b, d), on the encoder's device
            keys.append(key)
    if not feats:  # every image was skipped; the caller says so
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(keys)


def require_images(n: int, where: str | Path, skipped: Skipped) -> None:
    """One line when no image of `where` could be decoded: there is nothing to measure."""
    if n == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.by_reason.items())) or "no image files"
        raise ValueError(f"{where}: no image could be decoded ({reasons}); first: {'; '.join(skipped.first) or 'none'}")


@torch.no_grad()
def text_features(encoder: Encoder, tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """[n, d] fp32 unit rows for int64 tokens [n, 77]."""
    device = encoder_device(encoder)
    with eval_mode(encoder):
        out = [F.normalize(encoder.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1)
               for i in range(0, len(tokens), batch_size)]  # fmt: skip
    return torch.cat(out) if out else torch.empty(0, 0)
