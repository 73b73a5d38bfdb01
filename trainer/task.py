"""The multi-objective forward: a batch in, a dict of losses and metrics out."""
from __future__ import annotations

from typing import Any, Callable

import torch

from trainer.config import LossConfig
from trainer.objectives import Objective


class ContrastiveTask:
    def __init__(self, objective: Objective, loss: LossConfig, group: Any = None) -> None:
        self.objective, self.loss_cfg, self.group = objective, loss, group
        self.inputs = tuple(objective.views) + (("text",) if objective.text else ())

    def __call__(self, model: Callable[..., dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = model(**{k: batch[k] for k in self.inputs})
        c = self.loss_cfg
        losses = self.objective.loss(outputs, c.ssl_scale, c.ssl_temp, c.backend, self.group)
        if "logit_scale" in outputs:
            losses["logit_scale"] = outputs["logit_scale"].detach().reshape(())
        return losses
