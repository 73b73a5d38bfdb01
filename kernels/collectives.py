"""Collectives for the contrastive losses: one gradient-carrying all-gather per step.

Every rank computes its own rows against the candidates of all ranks, so a candidate row
receives gradient from every rank's loss. The backward of the gather is therefore a sum
over ranks followed by taking this rank's slice: a reduce-scatter. After the engine
averages parameter gradients over ranks, the result equals the gradient of the
global-batch loss computed in one process (see DESIGN.md, "what exact means").

Rank and world size always come from the group that is passed in; nothing here reads
global distributed state.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.10 renamed the single-tensor collectives; fall back to the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) within `group`; None means one process and no collectives."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_same_shape(x: Tensor, group: dist.ProcessGroup) -> None:
    """Raise ValueError on every rank unless every rank holds a tensor of x's 2-d shape.

    A gather of mismatched sizes hangs or fails deep in the backend; exchanging the two
    sizes first is cheap and lets every rank raise the same readable error.
    """
    _, world = rank_and_world(group)
    local = torch.tensor(x.shape, dtype=torch.int64, device=x.device)  # (2,)
    shapes = torch.empty(world * 2, dtype=torch.int64, device=x.device)  # (W*2,): gloo wants the flat form
    _all_gather(shapes, local, group=group)
    rows = shapes.view(world, 2).tolist()
    if any(r != rows[0] for r in rows):
        per_rank = ", ".join(f"rank {i}: {b}x{d}" for i, (b, d) in enumerate(rows))
        raise ValueError(f"contrastive loss needs the same local batch on every rank, got {per_rank}")


def _sum_and_slice(grad: Tensor, group: dist.ProcessGroup) -> Tensor:
    """grad: [W*b, d] -> this rank's [b, d] slice of the sum over ranks."""
    rank, world = rank_and_world(group)
    b = grad.shape[0] // world
    out = grad.new_empty(b, grad.shape[1])  # (b, d)
    try:
        _reduce_scatter(out, grad, group=group)
        return out
    except (RuntimeError, NotImplementedError) as err:
        # Backends without reduce-scatter (gloo before torch 2.6) say so when called;
        # any other failure is real and must surface.
        if "support" not in str(err).lower():
            raise
    total = grad.clone()  # all_reduce is in place; the incoming grad may be shared
    dist.all_reduce(total, group=group)
    return total[rank * b : (rank + 1) * b]


class _AllGatherRows(torch.autograd.Function):
    """[b, d] on each rank -> [W*b, d], rank r's rows at r*b; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        _, world = rank_and_world(group)
        out = x.new_empty(world * x.shape[0], x.shape[1])  # (W*b, d)
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _sum_and_slice(grad.contiguous(), ctx.group), None


def all_gather_rows(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Gather x: [b, d] from every rank of `group` with gradient; identity for one rank."""
    _, world = rank_and_world(group)
    if world == 1:
        return x
    return _AllGatherRows.apply(x, group)


def gather_all(tensors: Sequence[Tensor], group: dist.ProcessGroup | None) -> list[Tensor]:
    """Gather several [b, d_k] tensors with one collective: concatenate along dim 1,
    check that every rank agrees on the shape, gather once, split back into [W*b, d_k]."""
    _, world = rank_and_world(group)
    if world == 1:
        return list(tensors)
    widths = [t.shape[1] for t in tensors]
    packed = torch.cat(tensors, dim=1)  # (b, sum d_k)
    check_same_shape(packed, group)
    return list(all_gather_rows(packed, group).split(widths, dim=1))  # each (W*b, d_k)
