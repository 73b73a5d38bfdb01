"""Contrastive losses (reference backend now; tiled backends register alongside) and the
collectives they need. Imports nothing from `trainer` or `pipeline`."""
from . import contrastive

__all__ = ["contrastive"]
