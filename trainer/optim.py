"""Optimizers and their parameter groups."""
from __future__ import annotations

import torch
from torch import nn

from trainer.config import LR_SCALING, OptimConfig
from trainer.engine import fused_lamb
from trainer.lamb import Lamb


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """The recipe's lr moved from base_batch to the batch actually trained with: linear for
    SGD-like optimizers (Goyal et al. 2017), square root for Adam and LAMB (You et al. 2020)."""
    return optim.lr * (global_batch / optim.base_batch) ** LR_SCALING[optim.lr_scaling]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on matrices: biases, norm scales, logit_scale and other 1-d params are exempt."""
    decay, no_decay = [], []
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    *,
    device: str = "cpu",
) -> torch.optim.Optimizer:
    """adamw: torch's AdamW. lamb: DeepSpeed's fused CUDA LAMB on "cuda", else its torch twin `trainer.lamb.Lamb`."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    if name == "lamb":
        if torch.device(device).type == "cuda":
            return fused_lamb(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
        return Lamb(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer '{name}'")
