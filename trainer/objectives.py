"""Objectives by name: which views and model parts a step needs, and which loss it computes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import contrastive
from trainer.models import ModelParts

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    views: tuple[str, ...]  # image outputs the pipeline must produce
    parts: ModelParts
    loss: Callable[[Outputs, float, float, str, object, str], dict[str, torch.Tensor]]  # out, ssl_scale, ssl_temp, backend, group, clip_negatives

    @property
    def text(self) -> bool:
        return self.parts.text


def _slip(out: Outputs, ssl_scale: float, ssl_temp: float, backend: str, group: object, clip_negatives: str = "exact") -> dict[str, torch.Tensor]:
    return contrastive.slip_loss(
        out["image_embed"], out["text_embed"], out["logit_scale"], out["aug1_embed"], out["aug2_embed"],
        ssl_scale=ssl_scale, ssl_temp=ssl_temp, backend=backend, group=group, clip_negatives=clip_negatives,
    )  # fmt: skip


def _clip(out: Outputs, ssl_scale: float, ssl_temp: float, backend: str, group: object, clip_negatives: str = "exact") -> dict[str, torch.Tensor]:
    return contrastive.clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"], backend=backend, group=group, clip_negatives=clip_negatives)


def _simclr(out: Outputs, ssl_scale: float, ssl_temp: float, backend: str, group: object, clip_negatives: str = "exact") -> dict[str, torch.Tensor]:
    return contrastive.simclr_loss(out["aug1_embed"], out["aug2_embed"], ssl_temp, backend=backend, group=group)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("slip", ("image", "aug1", "aug2"), ModelParts(clip=True, ssl=True), _slip),
        Objective("clip", ("image",), ModelParts(clip=True, ssl=False), _clip),
        Objective("simclr", ("aug1", "aug2"), ModelParts(clip=False, ssl=True), _simclr),
    )
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
