"""Public API of the contrastive losses: CLIP, SimCLR (NT-Xent) and SLIP = CLIP + SSL.

The functions normalise the raw embeddings, gather every tensor the loss needs from all
ranks with one gradient-carrying all-gather, and hand the rows to a backend registered
by name. Each rank's result is the mean over its own rows against all W*b candidates;
averaged over ranks (as the engine averages gradients) it is the global-batch loss.

    from kernels import contrastive
    out = contrastive.slip_loss(image, text, logit_scale, aug1, aug2, group=group)
    out["loss"].backward()
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import chunked, collectives, reference


class Backend(NamedTuple):
    """Row kernels with the signatures of kernels/reference.py's `clip` and `simclr`.

    bf16_products: given bf16 embeddings, the kernels take bf16 unit vectors (normalised in
    fp32, then rounded): the all-gather moves half the bytes and the tile products run
    bf16 x bf16 with fp32 accumulation, while every per-row value stays fp32. Otherwise
    (and for fp32 or fp64 embeddings) they take the fp32 (fp64) unit vectors.
    """

    clip: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]]
    simclr: Callable[[Tensor, Tensor, Tensor, Tensor, float, int], tuple[Tensor, Tensor]]
    bf16_products: bool = False


def _triton() -> Backend:
    # Imported on first use: Triton is only needed when the backend is chosen.
    from . import triton_lse

    # bf16 tensor-core dots are what makes the fused kernels fast; fp32 runs as TF32x3.
    return Backend(clip=triton_lse.clip, simclr=triton_lse.simclr, bf16_products=True)


_REGISTRY: dict[str, Backend | Callable[[], Backend]] = {
    # The oracle, and torch tiles whose bf16 matmuls on the CPU would be slow and less exact.
    "reference": Backend(clip=reference.clip, simclr=reference.simclr, bf16_products=False),
    "chunked": Backend(clip=chunked.clip, simclr=chunked.simclr, bf16_products=False),
    "triton": _triton,
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)
DEFAULT_BACKEND = "chunked"  # the tiled one: no [b, B] logits; "reference" is the oracle
# What CLIP's candidates from the gather are to autograd. exact: gathered with gradient, so the
# loss is the global batch's. detached: constants (every rank's rows, this rank's included), so
# an embedding gets gradient only as the query of its own row, as SLIP's reference computes it.
CLIP_NEGATIVES: tuple[str, ...] = ("exact", "detached")


def _backend(name: str) -> Backend:
    try:
        impl = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown contrastive backend {name!r}; available: {', '.join(BACKENDS)}") from None
    if not isinstance(impl, Backend):
        impl = _REGISTRY[name] = impl()
    return impl


def _gather_clip(x: Tensor, y: Tensor, clip_negatives: str, group: dist.ProcessGroup | None) -> list[Tensor]:
    """CLIP's candidates [B, d] from every rank; detached: gathered as constants (no backward
    reduce-scatter). One process has nothing to detach: its candidates are its own rows."""
    if clip_negatives not in CLIP_NEGATIVES:
        raise ValueError(f"unknown clip_negatives {clip_negatives!r}; available: {', '.join(CLIP_NEGATIVES)}")
    if clip_negatives == "exact" or collectives.rank_and_world(group)[1] == 1:
        return collectives.gather_all([x, y], group)
    with torch.no_grad():
        return collectives.gather_all([x, y], group)


def _normalise(impl: Backend, *embeds: Tensor) -> list[Tensor]:
    """L2-normalise [b, d] embeddings in at least fp32 (a bf16 norm, or bf16 sums of
    products, lose the digits the loss lives on); fp64 stays fp64 so gradcheck works.
    bf16 embeddings come back as bf16 unit vectors for a backend with bf16_products, whose
    kernels multiply them exactly into fp32; the gradient flows back through the rounding."""
    b = embeds[0].shape[0]
    for e in embeds:
        if e.dim() != 2 or e.shape[0] != b:
            shapes = ", ".join(str(tuple(t.shape)) for t in embeds)
            raise ValueError(f"embeddings must be [b, d] with the same b, got {shapes}")
    dtype = torch.promote_types(torch.float32, embeds[0].dtype)
    for e in embeds[1:]:
        dtype = torch.promote_types(dtype, e.dtype)
    units = [F.normalize(e.to(dtype), dim=-1) for e in embeds]  # each (b, d_k)
    if impl.bf16_products and all(e.dtype == torch.bfloat16 for e in embeds):
        units = [u.to(torch.bfloat16) for u in units]
    return units


def clip_loss(
    image_embed: Tensor,
    text_embed: Tensor,
    logit_scale: Tensor,
    *,
    backend: str = DEFAULT_BACKEND,
    group: dist.ProcessGroup | None = None,
    clip_negatives: str = "exact",
) -> dict[str, Tensor]:
    """CLIP InfoNCE. image_embed, text_embed: [b, d]; logit_scale: [1], already exp()'d;
    clip_negatives: one of CLIP_NEGATIVES.

    Returns {"loss", "clip_loss", "clip_acc"} (acc: image-to-text top-1, percent)."""
    impl = _backend(backend)
    rank, _ = collectives.rank_and_world(group)
    x, y = _normalise(impl, image_embed, text_embed)  # (b, d) each
    x_all, y_all = _gather_clip(x, y, clip_negatives, group)  # (B, d) each
    loss, acc = impl.clip(x, y, x_all, y_all, logit_scale.to(chunked.row_dtype(x)), rank * x.shape[0])
    return {"loss": loss, "clip_loss": loss, "clip_acc": acc}


def simclr_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    *,
    backend: str = DEFAULT_BACKEND,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Tensor]:
    """NT-Xent over two views z1, z2: [b, d]. Returns {"loss", "ssl_loss", "ssl_acc"}."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    impl = _backend(backend)
    rank, _ = collectives.rank_and_world(group)
    a, b = _normalise(impl, z1, z2)  # (b, d) each
    a_all, b_all = collectives.gather_all([a, b], group)  # (B, d) each
    loss, acc = impl.simclr(a, b, a_all, b_all, float(temperature), rank * a.shape[0])
    return {"loss": loss, "ssl_loss": loss, "ssl_acc": acc}


def slip_loss(
    image_embed: Tensor,
    text_embed: Tensor,
    logit_scale: Tensor,
    aug1_embed: Tensor,
    aug2_embed: Tensor,
    *,
    ssl_scale: float = 1.0,
    ssl_temp: float = 0.1,
    backend: str = DEFAULT_BACKEND,
    group: dist.ProcessGroup | None = None,
    clip_negatives: str = "exact",
) -> dict[str, Tensor]:
    """SLIP: clip_loss + ssl_scale * simclr_loss, with one all-gather for all four embeddings
    (two with clip_negatives=detached: SimCLR's candidates keep their gradient).
    Returns {"loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"}."""
    if ssl_temp <= 0:
        raise ValueError(f"ssl_temp must be positive, got {ssl_temp}")
    impl = _backend(backend)
    rank, _ = collectives.rank_and_world(group)
    x, y, a, b = _normalise(impl, image_embed, text_embed, aug1_embed, aug2_embed)  # (b, d_k) each
    if clip_negatives == "exact":
        x_all, y_all, a_all, b_all = collectives.gather_all([x, y, a, b], group)  # (B, d_k) each
    else:
        x_all, y_all = _gather_clip(x, y, clip_negatives, group)  # (B, d) each, constants
        a_all, b_all = collectives.gather_all([a, b], group)  # (B, d_ssl) each
    offset = rank * x.shape[0]
    clip, clip_acc = impl.clip(x, y, x_all, y_all, logit_scale.to(chunked.row_dtype(x)), offset)
    ssl, ssl_acc = impl.simclr(a, b, a_all, b_all, float(ssl_temp), offset)
    return {
        "loss": clip + ssl_scale * ssl,
        "clip_loss": clip,
        "ssl_loss": ssl,
        "clip_acc": clip_acc,
        "ssl_acc": ssl_acc,
    }
