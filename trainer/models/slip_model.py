"""The SLIP model and its ablations: which parts exist is decided by the objective."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from trainer.models.text import TextTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: the temperature never drops below 0.01


@dataclass(frozen=True)
class ModelParts:
    clip: bool  # image projection + text tower + logit scale
    ssl: bool  # SimCLR MLP head on the augmented views

    @property
    def text(self) -> bool:
        return self.clip


def ssl_head(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """SLIP's 3-layer SimCLR projection MLP. BatchNorm becomes cross-rank when the trainer parallelises it."""
    return nn.Sequential(
        OrderedDict(
            [
                ("layer1", nn.Linear(in_dim, mlp_dim)),
                ("bn1", nn.BatchNorm1d(mlp_dim)),
                ("relu1", nn.ReLU(inplace=True)),
                ("layer2", nn.Linear(mlp_dim, mlp_dim)),
                ("bn2", nn.BatchNorm1d(mlp_dim)),
                ("relu2", nn.ReLU(inplace=True)),
                ("layer3", nn.Linear(mlp_dim, out_dim)),
            ]
        )
    )


class SlipModel(nn.Module):
    """Views and tokens in, un-normalised embeddings out (the loss normalises)."""

    def __init__(
        self,
        visual: nn.Module,
        vision_width: int,
        text: TextTransformer | None,
        parts: ModelParts,
        *,
        embed_dim: int,
        ssl_mlp_dim: int,
        ssl_emb_dim: int,
    ) -> None:
        super().__init__()
        self.parts = parts
        self.visual = visual
        if parts.clip:
            if text is None:
                raise ValueError("a CLIP objective needs a text tower")
            self.text = text
            self.image_projection = nn.Parameter(torch.randn(vision_width, embed_dim) * vision_width**-0.5)
            self.text_projection = nn.Parameter(torch.randn(text.width, embed_dim) * text.width**-0.5)
            # Shape [1], not []: DeepSpeed 0.19.8 fails in initialize on 0-dim parameters.
            self.logit_scale = nn.Parameter(torch.full([1], INIT_LOGIT_SCALE))
        if parts.ssl:
            self.image_mlp = ssl_head(vision_width, ssl_mlp_dim, ssl_emb_dim)
        # Patch dropout (FLIP) per view, in training mode only: set by the trainer, not saved.
        self.patch_dropout = {"image": 0.0, "aug1": 0.0, "aug2": 0.0}

    def set_patch_dropout(self, clip: float, ssl: float) -> None:
        """The fraction of patch tokens dropped from the CLIP view and from the two SimCLR views."""
        for name, rate in (("clip", clip), ("ssl", ssl)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"patch dropout of the {name} views must be in [0, 1), got {rate}")
        self.patch_dropout = {"image": clip, "aug1": ssl, "aug2": ssl}

    def param_bounds(self) -> dict[str, tuple[float, float]]:
        """Parameters kept within [low, high] after every optimizer step, by name: CLIP's logit scale."""
        return {"logit_scale": (0.0, MAX_LOGIT_SCALE)} if self.parts.clip else {}

    @property
    def has_text(self) -> bool:
        """Whether there is a text tower: evaluation asks before it decodes anything."""
        return self.parts.text

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image) @ self.image_projection  # (b, embed_dim)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        if not self.parts.text:
            raise ValueError("encode_text needs a text tower; this model was trained without one (SimCLR): use `slip eval linear`")
        return self.text(text) @ self.text_projection  # (b, embed_dim)

    def _vision_features(self, names: list[str], views: list[torch.Tensor]) -> list[torch.Tensor]:
        drops = [self.patch_dropout.get(n, 0.0) if self.training else 0.0 for n in names]
        if any(drops) or len({tuple(v.shape[1:]) for v in views}) > 1:
            return self.visual(views, drops)
        # Same-shaped views without dropout share one forward: bigger matmuls, one pass over the weights.
        return list(self.visual(torch.cat(views)).split([v.shape[0] for v in views]))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block of both towers in backward instead of keeping its
        activations: about one block's activations per tower instead of all of them, for
        roughly one extra forward of the towers. The heads are small and are not checkpointed."""
        self.visual.set_grad_checkpointing(enable)
        if self.parts.text:
            self.text.set_grad_checkpointing(enable)

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        aug1: torch.Tensor | None = None,
        aug2: torch.Tensor | None = None,
        *,
        stage: str = "all",
        features: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """stage "all": inputs -> embeddings. "towers": inputs -> tower features
        {"image", "aug1", "aug2": [b, vision_width], "text": [b, text_width]} (those given).
        "heads": `features=` such a dict -> embeddings; "all" is heads(towers(...)).

        The stages are selected here rather than by calling submodules because DeepSpeed
        ZeRO-3 gathers a module's own parameters (image_projection, logit_scale) only in the
        hooks of the module that is called: a split forward must still enter this one."""
        if stage == "towers":
            return self._towers(image, text, aug1, aug2)
        if stage == "heads":
            if features is None:
                raise ValueError("stage 'heads' needs features=, the output of stage 'towers'")
            return self._heads(features)
        if stage != "all":
            raise ValueError(f"unknown stage {stage!r}; known: all, towers, heads")
        return self._heads(self._towers(image, text, aug1, aug2))

    def _towers(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        aug1: torch.Tensor | None,
        aug2: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        names = [n for n, v in (("image", image), ("aug1", aug1), ("aug2", aug2)) if v is not None]
        feats = dict(zip(names, self._vision_features(names, [v for v in (image, aug1, aug2) if v is not None])))  # each (b, vision_width)
        if text is not None:
            feats["text"] = self.text(text)  # (b, text_width)
        return feats

    def _heads(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "image" in feats:
            out["image_embed"] = feats["image"] @ self.image_projection  # (b, embed_dim)
        if "text" in feats:
            out["text_embed"] = feats["text"] @ self.text_projection  # (b, embed_dim)
        if self.parts.clip:
            # Not clamped here: a clamp in the forward zeroes the gradient past the bound, and a
            # scale that got there could never come down. The optimizer clamps the parameter
            # after every step instead (param_bounds; trainer.optim.clamp_after_steps).
            out["logit_scale"] = self.logit_scale.exp()  # (1,)
        for view in ("aug1", "aug2"):
            if view in feats:
                out[f"{view}_embed"] = self.image_mlp(feats[view])  # (b, ssl_emb_dim)
        return out
