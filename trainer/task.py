"""The multi-objective forward: a batch in, a dict of losses and metrics out."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainer.config import LossConfig
from trainer.objectives import Objective

Model = Callable[..., dict[str, torch.Tensor]]  # a SlipModel or the engine around one


class TrainingTask:
    def __init__(self, objective: Objective, loss: LossConfig, group: Any = None) -> None:
        self.objective, self.loss_cfg, self.group = objective, loss, group
        self.inputs = tuple(objective.views) + (("text",) if objective.text else ())

    def __call__(self, model: Model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss(model(**self.model_inputs(batch)))

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch entries the objective's model consumes (views and, with a text tower, tokens)."""
        return {k: batch[k] for k in self.inputs}

    def towers(self, model: Model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tower features {"image", "aug1", "aug2": [b, vision_width], "text": [b, text_width]}
        (the objective's), i.e. everything before the projections and the SimCLR head."""
        return model(**self.model_inputs(batch), stage="towers")

    def heads_and_loss(self, model: Model, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rest of the forward and the loss: task(model, batch) == heads_and_loss(model, towers(model, batch))."""
        return self.loss(model(stage="heads", features=features))

    def loss(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objective's losses and metrics from the model's output dict."""
        c = self.loss_cfg
        losses = self.objective.loss(outputs, c.ssl_scale, c.ssl_temp, c.backend, self.group, c.clip_negatives)
        if "logit_scale" in outputs:
            losses["logit_scale"] = outputs["logit_scale"].detach().reshape(())
        return losses
