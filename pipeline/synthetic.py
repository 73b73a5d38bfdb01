"""Synthetic batches: random tensors in the batch contract, made once on the training device.

What open_clip's `--dataset-type synthetic` and torchtitan's test datasets are for: the compute
side of a step measured alone (`slip profile step` with `data.loader=synthetic`), with no
files, no decode and no DALI or FFCV, so it runs on a node that has the offline bundle's first
tier only. The views are standard normal (what normalised images are, roughly); every caption
runs to the full context, its end token (the largest id) last, as the FLOP count assumes.
Two batches are made up front and handed out in turn, so the loader costs the step nothing.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipeline.augment_config import VIEWS

POOL = 2  # distinct batches, cycled


class SyntheticBatches(Iterator[dict[str, torch.Tensor]]):
    def __init__(
        self,
        views: tuple[str, ...],
        *,
        batch_size: int,
        image_size: int,
        text: bool,
        context_length: int,
        vocab_size: int,
        device: torch.device,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
    ) -> None:
        """`batch_size`: this rank's rows; `views`: the image outputs the objective needs."""
        unknown = set(views) - set(VIEWS)
        if not views or unknown:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {views}")
        self.step = start_step
        self.replaced = 0  # the training loop's counter of corrupt samples: there are none
        self.prefetch = 0  # nothing is prepared ahead: every batch already exists
        g = torch.Generator(device=device).manual_seed(seed)
        self._pool = []
        for k in range(POOL):
            batch = {v: torch.randn(batch_size, 3, image_size, image_size, generator=g, device=device) for v in VIEWS if v in views}  # (b, 3, S, S)
            if text:
                tokens = torch.randint(1, vocab_size - 1, (batch_size, context_length), generator=g, device=device)  # (b, L)
                tokens[:, -1] = vocab_size - 1  # the end token, where the text tower pools
                batch["text"] = tokens
            first = (rank * POOL + k) * batch_size
            batch["index"] = torch.arange(first, first + batch_size, device=device)  # (b,) distinct per rank and pool slot
            self._pool.append(batch)

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._pool[self.step % POOL]
        self.step += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"step": self.step}

    def close(self) -> None:
        self._pool = []
