"""The model a config describes. Free of DeepSpeed, so readers of exported weights need only torch and timm."""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.models.contrastive import ContrastiveModel
from trainer.models.registry import build_model

if TYPE_CHECKING:
    from trainer.config import Config


def model_from_config(cfg: Config) -> ContrastiveModel:
    """The architecture of `cfg.model` for `cfg.augment.image_size`, freshly initialised from torch's RNG."""
    from trainer.objectives import get_objective

    m = cfg.model
    return build_model(
        m.size,
        get_objective(m.objective).parts,
        image_size=cfg.augment.image_size,
        embed_dim=m.embed_dim,
        ssl_mlp_dim=m.ssl_mlp_dim,
        ssl_emb_dim=m.ssl_emb_dim,
        context_length=m.context_length,
        vocab_size=m.vocab_size,
    )
