"""Contrastive losses (CLIP, SimCLR, SLIP) with three backends, `reference` (the oracle),
`chunked` (torch tiles) and `triton` (fused kernels), and the collectives and cross-rank
BatchNorm they need. A library: it imports no other slipstream package."""
from . import contrastive

__all__ = ["contrastive"]
