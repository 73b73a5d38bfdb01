"""Synthetic batches: random tensors in the batch contract, made once on the training device.

What open_clip's `--dataset-type synthetic` and torchtitan's test datasets are for: the compute
side of a step measured alone (`slip profile step` with `data.loader=synthetic`), with no
files, no decode and no DALI or FFCV, so it runs on a node that has the offline bundle's first
tier only. The views are standard normal (what normalised images are, roughly); every caption
runs to the full context, its end token (the largest id) last, as the FLOP count assumes.
Two batches are made up front and handed out in turn, so the loader costs the step nothing;
when the views' sides change (`sizes`, as the DALI loader takes it), two are made anew.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
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
        ssl_image_size: int = 0,
        sizes: Callable[[int], tuple[int, int]] | None = None,
    ) -> None:
        """`batch_size`: this rank's rows; `views`: the image outputs the objective needs, the
        CLIP view `image_size` square, the SimCLR views `ssl_image_size` (0: image_size);
        `sizes(step)`: (CLIP side, SimCLR side) of a step's batch, in place of those two."""
        unknown = set(views) - set(VIEWS)
        if not views or unknown:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {views}")
        self.step = start_step
        self.replaced = 0  # the training loop's counter of corrupt samples: there are none
        self.prefetch = 0  # nothing is prepared ahead: every batch already exists
        own = (image_size, ssl_image_size or image_size)
        self.sizes = sizes or (lambda step: own)
        self._make = functools.partial(
            _pool, views, batch_size=batch_size, text=text, context_length=context_length, vocab_size=vocab_size, device=device, seed=seed, rank=rank
        )  # fmt: skip
        self._sides = tuple(self.sizes(start_step))
        self._pool = self._make(self._sides)

    def __next__(self) -> dict[str, torch.Tensor]:
        sides = tuple(self.sizes(self.step))
        if sides != self._sides:
            self._sides, self._pool = sides, self._make(sides)
        batch = self._pool[self.step % POOL]
        self.step += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"step": self.step}

    def close(self) -> None:
        self._pool = []


def _pool(
    views: tuple[str, ...], sides: tuple[int, int], *, batch_size: int, text: bool, context_length: int, vocab_size: int, device: torch.device, seed: int, rank: int
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """The POOL batches of one pair of sides: the same draws whenever the sides come round again."""
    g = torch.Generator(device=device).manual_seed(seed)
    pool = []
    for k in range(POOL):
        side = {"image": sides[0], "aug1": sides[1], "aug2": sides[1]}
        batch = {v: torch.randn(batch_size, 3, side[v], side[v], generator=g, device=device) for v in VIEWS if v in views}  # (b, 3, S, S)
        if text:
            tokens = torch.randint(1, vocab_size - 1, (batch_size, context_length), generator=g, device=device)  # (b, L)
            tokens[:, -1] = vocab_size - 1  # the end token, where the text tower pools
            batch["text"] = tokens
        first = (rank * POOL + k) * batch_size
        batch["index"] = torch.arange(first, first + batch_size, device=device)  # (b,) distinct per rank and pool slot
        pool.append(batch)
    return pool
