"""Model sizes by name. An objective decides which parts of the model exist."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.models.slip_model import ModelParts, SlipModel
from trainer.models.text import TextTransformer
from trainer.models.vision import build_vit


@dataclass(frozen=True)
class TowerSizes:
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8


SIZES: dict[str, TowerSizes] = {}


def register_size(name: str, sizes: TowerSizes) -> None:
    if name in SIZES:
        raise ValueError(f"model size '{name}' is registered twice")
    SIZES[name] = sizes


# A CPU-sized model for the demo and the tests: 64 px inputs, patch 8 -> 64 tokens.
register_size("tiny", TowerSizes(8, 96, 3, 3, text_width=128, text_layers=3, text_heads=4))
# SLIP's towers: ViT-S/16 with 12 heads as in MoCo v3, ViT-B/16, ViT-L/16; CLIP's text transformer.
register_size("vits16", TowerSizes(16, 384, 12, 12))
register_size("vitb16", TowerSizes(16, 768, 12, 12))
register_size("vitl16", TowerSizes(16, 1024, 24, 16))


def build_model(
    size: str,
    parts: ModelParts,
    *,
    image_size: int,
    embed_dim: int = 512,
    ssl_mlp_dim: int = 4096,
    ssl_emb_dim: int = 256,
    context_length: int = 77,
    vocab_size: int = 49408,
    dynamic_img_size: bool = False,
) -> SlipModel:
    """`dynamic_img_size`: the image tower takes views of other sizes than `image_size` (see `build_vit`)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}'; known: {', '.join(SIZES)}")
    s = SIZES[size]
    if image_size % s.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of {size}'s patch size {s.patch_size}")
    visual = build_vit(image_size, s.patch_size, s.vision_width, s.vision_depth, s.vision_heads, dynamic_img_size=dynamic_img_size)
    text = None
    if parts.text:
        text = TextTransformer(s.text_width, s.text_layers, s.text_heads, context_length, vocab_size)
    return SlipModel(
        visual, s.vision_width, text, parts, embed_dim=embed_dim, ssl_mlp_dim=ssl_mlp_dim, ssl_emb_dim=ssl_emb_dim
    )
