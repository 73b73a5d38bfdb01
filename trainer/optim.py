"""Optimizers and their parameter groups."""
from __future__ import annotations

import torch
from torch import nn


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
            from deepspeed.ops.lamb import FusedLamb  # JIT-builds the CUDA op on first use

            return FusedLamb(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
        from trainer.lamb import Lamb

        return Lamb(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer '{name}'")
