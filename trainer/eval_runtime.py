"""What every evaluation shares: where DALI decodes, the progress bar, and eval mode for its duration."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch
from tqdm import tqdm


def dali_device(model: torch.nn.Module) -> dict:
    """Decode where the model runs: nvJPEG on its GPU, or DALI's CPU operators."""
    device = next(model.parameters()).device
    return {"device": "gpu", "device_id": device.index or 0} if device.type == "cuda" else {"device": "cpu"}


def batch_bar(iterable: Iterable, total: int, desc: str) -> Iterator:
    return iter(tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=os.environ.get("CI") == "true"))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() for the block, the previous mode restored even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
