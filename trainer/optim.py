"""Optimizers and their parameter groups."""
from __future__ import annotations

import torch
from torch import nn

from trainer.config import LR_SCALING, OptimConfig
from trainer.engine import fused_lamb, optimizer_master
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
    """adamw: torch's AdamW. lamb: DeepSpeed's fused CUDA LAMB on "cuda", else its torch twin
    `trainer.lamb.Lamb`. The model's bounded parameters (`param_bounds`) are clamped after each step."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    elif name == "lamb":
        optimizer = fused_lamb(groups, lr=lr, betas=betas, eps=eps) if torch.device(device).type == "cuda" else Lamb(groups, lr=lr, betas=betas, eps=eps)
    else:
        raise ValueError(f"unknown optimizer '{name}'")
    clamp_after_steps(optimizer, model)
    return optimizer


def clamp_after_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After every step of `optimizer`, clamp each of the model's bounded parameters in place, as
    CLIP clamps its logit scale (a forward clamp would stop its gradient at the bound).

    The hook is on this torch optimizer, which DeepSpeed's ZeRO optimizers step on their fp32
    masters before copying them into the module, so the clamp lands on the master at every
    stage. ZeRO steps one parameter group at a time: a master is clamped only by the step that
    updated it, never before its own update (which would then start from the clamped value)."""
    bounds = getattr(model, "param_bounds", dict)()
    bounded = [(model.get_parameter(name), low, high) for name, (low, high) in bounds.items()]
    if not bounded:
        return

    @torch.no_grad()
    def clamp(*_: object) -> None:
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        for param, low, high in bounded:
            master = optimizer_master(param)
            if master is not None and any(_inside(master, p) for p in stepped):
                master.clamp_(low, high)

    optimizer.register_step_post_hook(clamp)


def _inside(view: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether the memory of `view` (contiguous) lies within that of `tensor`, e.g. a flat partition."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return start <= view.data_ptr() and view.data_ptr() + view.numel() * view.element_size() <= end and view.device == tensor.device
