"""What evaluation needs of a model, and what every evaluation shares: where DALI decodes, the
progress bar, and eval mode for the evaluation's duration.

An encoder is anything with `encode_image` (and, for zero-shot and retrieval, `encode_text`):
a trained slipstream model, a released SLIP model loaded into one, or a wrapper around any
image tower (`ImageTower`, what the linear probe reads). Evaluation never needs to know which.
A class whose instances may lack a text tower (SimCLR's) says so with `has_text = False`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from tqdm import tqdm


class ImageEncoder(Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [b, 3, S, S] normalised -> features [b, d]."""
        ...


class Encoder(ImageEncoder, Protocol):
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 tokens [b, 77] -> features [b, d], in the image features' space."""
        ...


class ImageTower(torch.nn.Module):
    """An image tower (images -> pooled features) as an ImageEncoder: the features a linear
    probe reads are the tower's, before any projection head."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)  # (b, width)


def encoder_device(encoder: object) -> torch.device:
    """Where the encoder's weights live (the CPU for one without parameters)."""
    parameters = getattr(encoder, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def dali_device(encoder: object) -> dict:
    """Decode where the encoder runs: nvJPEG on its GPU, or DALI's CPU operators."""
    device = encoder_device(encoder)
    return {"device": "gpu", "device_id": device.index or 0} if device.type == "cuda" else {"device": "cpu"}


def progress(iterable: Iterable | None = None, *, total: int, desc: str, unit: str, quiet: bool = False) -> tqdm:
    """A transient bar on stderr, quiet under CI (and where `quiet`: ranks other than the first)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=quiet or os.environ.get("CI") == "true")


def batch_bar(iterable: Iterable, total: int, desc: str) -> Iterator:
    return iter(progress(iterable, total=total, desc=desc, unit="batch"))


@contextlib.contextmanager
def eval_mode(encoder: object) -> Iterator[None]:
    """encoder.eval() for the block (when it is a torch module), the previous mode restored even when the block raises."""
    if not isinstance(encoder, torch.nn.Module):
        yield
        return
    was_training = encoder.training
    encoder.eval()
    try:
        yield
    finally:
        encoder.train(was_training)
