"""CLIP's causal text transformer, with SLIP's parameter names so its checkpoints map 1:1."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """CLIP's GELU approximation; the released SLIP/CLIP text towers were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Checkpointing only pays when a backward will follow; in eval or under no_grad it
        # would only add overhead. Non-reentrant: unlike the reentrant variant it is correct
        # when the block's input needs no grad, and under torch.autograd.grad.
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
        return x


class TextTransformer(nn.Module):
    """Tokens [b, L] -> features [b, width] at each sequence's end token (the largest id)."""

    def __init__(self, width: int, layers: int, heads: int, context_length: int, vocab_size: int) -> None:
        super().__init__()
        self.width, self.context_length = width, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        # A float mask (-inf above the diagonal) so every position attends only to its past.
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)  # (L, L)
        self.register_buffer("causal_mask", causal, persistent=False)
        self._init_weights(layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in backward instead of storing its activations."""
        self.transformer.grad_checkpointing = enable

    def _init_weights(self, layers: int) -> None:
        # CLIP's initialisation: residual projections scaled down with depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, the model's context is {self.context_length}")
        end = text.argmax(dim=-1)  # (b,) the end token has the largest id
        # Attention is causal, so positions past the batch's last end token cannot change any
        # end token's feature: dropping them is exact, and short captions cost a fraction of 77.
        length = int(end.max()) + 1
        text = text[:, :length]
        x = self.token_embedding(text) + self.positional_embedding[:length]  # (b, L, width)
        x = self.transformer(x, self.causal_mask[:length, :length].to(x.dtype))
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), end]  # (b, width)
