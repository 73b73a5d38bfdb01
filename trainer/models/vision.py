"""The image tower: a timm VisionTransformer whose pooled class token is the image feature."""
from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer


def build_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int) -> VisionTransformer:
    # num_classes=0: timm returns the pooled [b, width] feature; SLIP projects it itself.
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        global_pool="token",
    )
