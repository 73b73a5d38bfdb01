"""Models: a registry of sizes, built into a two-tower contrastive model per objective."""
from trainer.models.registry import SIZES, TowerSizes, build_model

__all__ = ["SIZES", "TowerSizes", "build_model"]
