"""The image tower: a timm VisionTransformer whose pooled class token is the image feature, plus
the two things SLIP's training forward needs beyond timm's: patch dropout at a rate chosen per
call (FLIP), and one forward over several views that may differ in size and in tokens kept."""
from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer


def drop_patches(tokens: torch.Tensor, rate: float, prefix: int = 1) -> torch.Tensor:
    """[b, prefix + L, d] -> [b, prefix + keep, d]: the prefix (class) token and a random
    `keep = max(1, int(L * (1 - rate)))` of the patch tokens of each row; the others are gone
    before the first block, so no block computes them. The ranking noise comes from torch's CPU
    generator, which the trainer seeds per rank, checkpoints and GradCache replays: a step's masks
    are the same in GradCache's two passes and after a resume, on a GPU as on the CPU."""
    if rate <= 0.0:
        return tokens
    b, n, d = tokens.shape
    patches = n - prefix
    keep = max(1, int(patches * (1.0 - rate)))
    order = torch.rand(b, patches).argsort(dim=1)[:, :keep].to(tokens.device, non_blocking=True)  # (b, keep)
    kept = tokens[:, prefix:].gather(1, order.unsqueeze(-1).expand(b, keep, d))  # (b, keep, d)
    return torch.cat([tokens[:, :prefix], kept], dim=1)


class SlipViT(VisionTransformer):
    """`forward(images)` is timm's (no patch dropout: evaluation and export see this);
    `forward(views, drops)` is `forward_views`, the training forward of several views. Both go
    through the module's call: DeepSpeed ZeRO-3 gathers the tower's own parameters (class
    token, position embedding) only in the hooks of a module that is called."""

    def forward(self, x: torch.Tensor | list[torch.Tensor], drops: list[float] | None = None) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(x, list):
            return self.forward_views(x, drops if drops is not None else [0.0] * len(x))
        return super().forward(x)

    def tokens(self, images: torch.Tensor, drop: float) -> torch.Tensor:
        """[b, 3, H, W] -> [b, tokens, width] entering the first block (position embedding resampled
        to the grid when the tower was built with dynamic_img_size)."""
        x = self._pos_embed(self.patch_embed(images))
        return self.norm_pre(drop_patches(x, drop, self.num_prefix_tokens))

    def trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, tokens, width] -> the pooled feature [b, width]."""
        x = checkpoint_seq(self.blocks, tokens) if self.grad_checkpointing else self.blocks(tokens)
        return self.forward_head(self.norm(x))

    def forward_views(self, views: list[torch.Tensor], drops: list[float]) -> list[torch.Tensor]:
        """Pooled features [b_i, width] of each view [b_i, 3, S_i, S_i], with its patch dropout
        rate in training mode (none in eval mode). Views of one size and rate share the patch
        embedding; views whose token counts are equal share every block (one packed forward),
        whatever their sizes: e.g. a 224 px view with 50% of its 196 patches dropped packs with
        a 160 px view's 100 patches only if the counts match exactly, else each runs its own."""
        drops = [d if self.training else 0.0 for d in drops]
        by_input: dict[tuple, list[int]] = {}
        for i, (v, d) in enumerate(zip(views, drops)):
            by_input.setdefault((tuple(v.shape[1:]), d), []).append(i)
        tokens: list[torch.Tensor | None] = [None] * len(views)
        for (_, drop), idx in by_input.items():
            parts = self.tokens(torch.cat([views[i] for i in idx]), drop).split([views[i].shape[0] for i in idx])
            for i, part in zip(idx, parts):
                tokens[i] = part  # (b_i, n_i, width)
        by_length: dict[int, list[int]] = {}
        for i, t in enumerate(tokens):
            by_length.setdefault(t.shape[1], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(views)
        for idx in by_length.values():
            pooled = self.trunk(torch.cat([tokens[i] for i in idx]))  # (sum b_i, width)
            for i, part in zip(idx, pooled.split([views[i].shape[0] for i in idx])):
                out[i] = part
        return out


def build_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int, *, dynamic_img_size: bool = False) -> SlipViT:
    """`dynamic_img_size`: the tower takes any multiple of the patch size, its position embedding
    (a grid for `image_size`) resampled to each input's grid; needed when training views differ
    in size from `image_size` (light SSL views, progressive resolution)."""
    # num_classes=0: timm returns the pooled [b, width] feature; SLIP projects it itself.
    return SlipViT(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=dynamic_img_size,
    )
