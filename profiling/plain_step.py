"""The baseline step `slip profile step --plain-baseline` measures beside slipstream's: the SLIP
reference's way of training on one GPU. Plain torch: autocast over fp32 weights, torch's
AdamW, a plain backward, and the reference (oracle) loss, which materialises the logits as
SLIP's losses.py does. No DeepSpeed, no tiled loss. It plugs into `trainer.build.build` as the
step builder, so the model, the data and the measurement are the same as slipstream's.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from trainer.build import StepParts, init_model
from trainer.config import Config
from trainer.dist import DistInfo
from trainer.objectives import get_objective
from trainer.optim import build_optimizer, peak_lr
from trainer.task import TrainingTask

PLAIN_NAME = "plain torch, reference loss"


class PlainEngine:
    """What `trainer.loop.train_step` asks of an engine, in plain torch."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str) -> None:
        self.module, self.optimizer = module, optimizer
        self.device_type = next(module.parameters()).device.type
        self.bf16 = precision == "bf16"

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        context = torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with context:
            return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_optimization_stage(self) -> int:
        return 0

    def destroy(self) -> None:
        self.optimizer.state.clear()


def plain_step(cfg: Config, dist: DistInfo, device: str) -> StepParts:
    """The model at step 0 under plain torch with the reference loss: a `trainer.build.build` step builder."""
    if dist.world > 1:
        raise ValueError("the plain torch baseline runs in one process; run it without the launcher")
    if cfg.engine.micro_batches > 1:
        raise ValueError("the plain torch baseline has no GradCache: leave engine.micro_batches at 1")
    model = init_model(cfg).to(dist.device)
    o = cfg.optim
    peak = peak_lr(o, cfg.data.batch_size)
    optimizer = build_optimizer(model, "adamw", peak, o.weight_decay, o.betas, o.eps, device=device)
    loss = dataclasses.replace(cfg.loss, backend="reference")
    return StepParts(PlainEngine(model, optimizer, cfg.engine.precision), TrainingTask(get_objective(cfg.model.objective), loss, None), None, dist, peak)
