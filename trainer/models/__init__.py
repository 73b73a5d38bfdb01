"""Models: a registry of sizes, built into the SLIP model with the parts its objective needs.

A leaf of the trainer: torch and timm only, no config, no distributed code."""
from trainer.models.registry import SIZES, TowerSizes, build_model
from trainer.models.slip_model import ModelParts, SlipModel

__all__ = ["SIZES", "ModelParts", "SlipModel", "TowerSizes", "build_model"]
