"""The `chunked` backend: tiled log-sum-exp of scaled similarities; no [b, B] logits anywhere.

The one primitive is `tiled_lse(p, q, scale)`: the log-sum-exp over each row (and, when
asked, each column) of Z = scale * p @ q.T, walked in tiles of ROWS x COLS with an online
max and sum, plus each row's max and argmax for the accuracy. Only the [b] and [N] results
are saved; the backward recomputes each tile and turns it into softmax probabilities with
the saved log-sum-exps, as FlashAttention's backward does. Peak memory is
O((b + N) d + ROWS * COLS) instead of O(b N).

The losses are composed from it with ordinary autograd:
- CLIP row i: lse_i(x_i . y_all) - scale * x_i . y_pos. In one process Z = X Y^T serves
  both directions (image-to-text rows, text-to-image columns), so each tile is computed once.
- SimCLR view-a row i: logaddexp(lse over a_i . b_all, lse over a_i . a_all without its own
  entry) - a_i . b_pos / t; view b likewise, again from the same tiles in one process.

Same contract as kernels/reference.py: normalised embeddings in the compute dtype, this
rank's rows and every rank's candidates, `offset` = rank * b. The composition below
(clip_from_rows, simclr_from_rows) also serves the triton backend, whose embeddings may be
bf16 unit vectors: every per-row value (positive, scale, loss) is then computed in fp32.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .reference import SELF_MASK_LOGIT

ROWS, COLS = 1024, 4096  # tile of logits: 4M values, 16 MB in fp32

NO_MASK = -(1 << 40)  # a mask offset no (row, column) pair reaches


def _tile(p: Tensor, q: Tensor, scale: Tensor, r0: int, c0: int, mask_offset: int) -> tuple[Tensor, Tensor, tuple | None]:
    """(p.q^T, scale * p.q^T with entry (i, i + mask_offset) at SELF_MASK_LOGIT, the masked
    (rows, cols) of this tile or None), the first two [R, C]."""
    raw = p @ q.T  # (R, C)
    logits = raw * scale
    # Rows whose masked column falls in this tile: r0 + i + mask_offset in [c0, c0 + C).
    first = max(0, c0 - mask_offset - r0)
    last = min(p.shape[0], c0 + q.shape[0] - mask_offset - r0)
    if first >= last:
        return raw, logits, None
    rows = torch.arange(first, last, device=p.device)
    masked = (rows, rows + r0 + mask_offset - c0)
    logits[masked] = SELF_MASK_LOGIT  # finite: a fully masked row stays free of inf - inf
    return raw, logits, masked


def _split(run_max: Tensor, run_sum: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, what rounding lse lost). A row whose positive dominates has lse - z ~ 1e-7,
    below lse's own rounding (~2e-6 at 20): (lse - z) + lost keeps it, where lse - z alone
    would give 0. The positive logit, a separate dot product, is itself good to about one
    unit in the last place of the scale."""
    log_sum = torch.log(run_sum)
    lse = run_max + log_sum
    return lse, (run_max - lse) + log_sum


def _fold(run_max: Tensor, run_sum: Tensor, z: Tensor, z_max: Tensor) -> tuple[Tensor, Tensor]:
    """Online log-sum-exp: each row's running (max, sum of exp(. - max)) with the rows of
    z [R, C] (whose row maxima are z_max) folded in."""
    new_max = torch.maximum(run_max, z_max)
    return new_max, run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)


class _TiledLSE(torch.autograd.Function):
    """-> (row_lse [b], row_lost [b], col_lse [N], col_lost [N] (empty without cols),
    row_max [b], row_argmax [b]); only the lse outputs carry gradient."""

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor, scale: Tensor, cols: bool, mask_offset: int, tiles: tuple[int, int]):  # type: ignore[override]
        b, n = p.shape[0], q.shape[0]
        rows_t, cols_t = tiles
        row_lse, row_lost = p.new_empty(b), p.new_empty(b)  # (b,) each
        row_max = p.new_empty(b)  # (b,)
        row_arg = torch.empty(b, dtype=torch.int64, device=p.device)  # (b,)
        col_max = p.new_full((n if cols else 0,), float("-inf"))  # (N,)
        col_sum = p.new_zeros(n if cols else 0)  # (N,)
        for r0 in range(0, b, rows_t):
            p_blk = p[r0 : r0 + rows_t]
            run_max = p.new_full((p_blk.shape[0],), float("-inf"))  # (R,)
            run_sum = p.new_zeros(p_blk.shape[0])  # (R,)
            run_arg = torch.zeros(p_blk.shape[0], dtype=torch.int64, device=p.device)  # (R,)
            for c0 in range(0, n, cols_t):
                _, z, _ = _tile(p_blk, q[c0 : c0 + cols_t], scale, r0, c0, mask_offset)
                tile_max, tile_arg = z.max(dim=1)
                run_arg = torch.where(tile_max > run_max, tile_arg + c0, run_arg)  # first maximum wins
                run_max, run_sum = _fold(run_max, run_sum, z, tile_max)
                if cols:
                    c1 = c0 + z.shape[1]
                    col_max[c0:c1], col_sum[c0:c1] = _fold(col_max[c0:c1], col_sum[c0:c1], z.T, z.max(dim=0).values)
            row_lse[r0 : r0 + rows_t], row_lost[r0 : r0 + rows_t] = _split(run_max, run_sum)
            row_max[r0 : r0 + rows_t], row_arg[r0 : r0 + rows_t] = run_max, run_arg
        col_lse, col_lost = _split(col_max, col_sum)  # (N,) each, or empty
        ctx.save_for_backward(p, q, scale, row_lse, col_lse)
        ctx.cols, ctx.mask_offset, ctx.tiles = cols, mask_offset, tiles
        ctx.mark_non_differentiable(row_lost, col_lost, row_max, row_arg)
        return row_lse, row_lost, col_lse, col_lost, row_max, row_arg

    @staticmethod
    def backward(ctx, g_row: Tensor, _g_row_lost, g_col: Tensor, _g_col_lost, _g_max, _g_arg):  # type: ignore[override]
        p, q, scale, row_lse, col_lse = ctx.saved_tensors
        rows_t, cols_t = ctx.tiles
        b, n = p.shape[0], q.shape[0]
        grad_p, grad_q = torch.zeros_like(p), torch.zeros_like(q)
        grad_scale = torch.zeros_like(scale)
        want_scale = ctx.needs_input_grad[2]
        for r0 in range(0, b, rows_t):
            p_blk = p[r0 : r0 + rows_t]
            for c0 in range(0, n, cols_t):
                q_blk = q[c0 : c0 + cols_t]
                raw, z, masked = _tile(p_blk, q_blk, scale, r0, c0, ctx.mask_offset)
                c1 = c0 + z.shape[1]
                # d lse_i / d z_ij is row i's softmax (and column j's, for the columns).
                g = torch.exp(z - row_lse[r0 : r0 + rows_t, None]).mul_(g_row[r0 : r0 + rows_t, None])  # (R, C)
                if ctx.cols:
                    g += torch.exp(z - col_lse[None, c0:c1]).mul_(g_col[None, c0:c1])
                if masked is not None:
                    g[masked] = 0  # a masked entry is a constant, not a function of p and q
                grad_p[r0 : r0 + rows_t] += (g @ q_blk) * scale
                grad_q[c0:c1] += (g.T @ p_blk) * scale
                if want_scale:
                    grad_scale += (g * raw).sum()
        return grad_p, grad_q, grad_scale if want_scale else None, None, None, None


class _SymmetricTiledLSE(torch.autograd.Function):
    """Row log-sum-exp of Z = scale * p @ p.T without its diagonal, from the tiles on and above
    the diagonal only: tile (I, J) serves block I's rows and, transposed, block J's.
    -> (row_lse [b], row_lost [b], row_max [b])."""

    @staticmethod
    def forward(ctx, p: Tensor, scale: Tensor, tile: int):  # type: ignore[override]
        b = p.shape[0]
        run_max = p.new_full((b,), float("-inf"))  # (b,)
        run_sum = p.new_zeros(b)  # (b,)

        def update(r0: int, z: Tensor) -> None:  # fold z's rows into rows r0.. of the stats
            r1 = r0 + z.shape[0]
            run_max[r0:r1], run_sum[r0:r1] = _fold(run_max[r0:r1], run_sum[r0:r1], z, z.max(dim=1).values)

        for r0 in range(0, b, tile):
            for c0 in range(r0, b, tile):
                _, z, _ = _tile(p[r0 : r0 + tile], p[c0 : c0 + tile], scale, r0, c0, 0)
                update(r0, z)
                if c0 != r0:
                    update(c0, z.T)
        row_lse, row_lost = _split(run_max, run_sum)
        ctx.save_for_backward(p, scale, row_lse)
        ctx.tile = tile
        ctx.mark_non_differentiable(row_lost, run_max)
        return row_lse, row_lost, run_max

    @staticmethod
    def backward(ctx, g_row: Tensor, _g_lost: Tensor, _g_max: Tensor):  # type: ignore[override]
        p, scale, row_lse = ctx.saved_tensors
        b, tile = p.shape[0], ctx.tile
        grad = torch.zeros_like(p)
        grad_scale = torch.zeros_like(scale)
        for r0 in range(0, b, tile):
            for c0 in range(r0, b, tile):
                p_r, p_c = p[r0 : r0 + tile], p[c0 : c0 + tile]
                raw, z, masked = _tile(p_r, p_c, scale, r0, c0, 0)
                r1, c1 = r0 + z.shape[0], c0 + z.shape[1]
                g = torch.exp(z - row_lse[r0:r1, None]).mul_(g_row[r0:r1, None])  # (R, C) through row r
                if c0 != r0:  # the same entries, seen from the rows of block c
                    g += torch.exp(z - row_lse[None, c0:c1]).mul_(g_row[None, c0:c1])
                if masked is not None:
                    g[masked] = 0
                grad[r0:r1] += (g @ p_c) * scale
                grad[c0:c1] += (g.T @ p_r) * scale
                if ctx.needs_input_grad[1]:
                    grad_scale += (g * raw).sum()
        return grad, grad_scale if ctx.needs_input_grad[1] else None, None


def tiled_lse(
    p: Tensor, q: Tensor, scale: Tensor, *, cols: bool = False, mask_offset: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row (and column) log-sum-exp of scale * p @ q.T without materialising it.

    p: [b, d], q: [N, d], scale: [1]. mask_offset k leaves entry (i, i + k) out of the sums.
    Returns (row_lse [b], row_lost [b], col_lse [N], col_lost [N] (both [0] without cols),
    row_max [b], row_argmax [b]); the `lost` parts (see _split), max and argmax carry no
    gradient.
    """
    offset = NO_MASK if mask_offset is None else mask_offset
    return _TiledLSE.apply(p, q, scale.reshape(1), cols, offset, (ROWS, COLS))


def row_losses(lse: Tensor, lost: Tensor, positive: Tensor) -> Tensor:
    """lse - positive per row: the gradient of that, the value without its cancellation."""
    return (lse - positive) + lost


def merge(lse_1: Tensor, lost_1: Tensor, lse_2: Tensor, lost_2: Tensor) -> tuple[Tensor, Tensor]:
    """The log-sum-exp over the union of two candidate sets, and its lost part: the union's
    value is m + lost_m + log1p(exp(other - m)) with m the larger, which keeps the digits
    that logaddexp's own rounding drops (the smaller side's lost part is second order)."""
    lse = torch.logaddexp(lse_1, lse_2)
    with torch.no_grad():
        first = lse_1 >= lse_2
        larger, smaller = torch.where(first, lse_1, lse_2), torch.where(first, lse_2, lse_1)
        lost = (larger - lse) + torch.where(first, lost_1, lost_2) + torch.log1p(torch.exp(smaller - larger))
    return lse, lost


def row_dtype(embeds: Tensor) -> torch.dtype:
    """The dtype of per-row values (positives, scales, log-sum-exps) for embeddings of
    embeds' dtype: at least fp32, so bf16 unit vectors keep the loss's digits."""
    return torch.promote_types(torch.float32, embeds.dtype)


def positives(p: Tensor, q: Tensor) -> Tensor:
    """p_i . q_i for each row of p, q: [n, d], in row_dtype: the product of two bf16 values
    is exact in fp32, where a bf16 product and sum would keep 8 bits of it."""
    dtype = row_dtype(p)
    return (p.to(dtype) * q.to(dtype)).sum(dim=1)  # (n,)


def accuracy(correct: Tensor) -> Tensor:
    """Top-1 in percent from a [b] bool, as reference._top1 computes it."""
    return correct.float().mean().mul(100).detach()


RowsLSE = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]]
"""(p, q, scale, *, mask_offset=None, positive_offset=None) -> (row_lse, row_lost, row_max,
row_argmax, positive), the first four as tiled_lse's rows. positive: scale * p_i . q_{i + k}
for positive_offset k (None without one), a function of the candidate row q_{i + k} as the
softmax's entries are: where the candidates are constants (clip_negatives=detached) the
positive, too, gives gradient to the query p only."""


def _rows(
    p: Tensor, q: Tensor, scale: Tensor, *, mask_offset: int | None = None, positive_offset: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    lse, lost, _, _, row_max, arg = tiled_lse(p, q, scale, mask_offset=mask_offset)
    if positive_offset is None:
        return lse, lost, row_max, arg, None
    # fp32 or fp64 rows: the positive from the gathered copy loses nothing.
    return lse, lost, row_max, arg, scale * positives(p, q[positive_offset : positive_offset + p.shape[0]])  # (b,)


def _clip_loss(
    x: Tensor, y: Tensor, logit_scale: Tensor, offset: int, i2t: tuple, t2i: tuple, arg: Tensor, kernel_positives: tuple = (None, None)
) -> tuple[Tensor, Tensor]:
    """(loss, accuracy) from the (lse, lost) of both directions and the image rows' argmax;
    kernel_positives: both directions' positive logits where the row kernel computed them."""
    pos_i2t, pos_t2i = kernel_positives
    if pos_i2t is None or pos_t2i is None:
        pos_i2t = pos_t2i = logit_scale * positives(x, y)  # (b,) the matching pairs are both local
    loss = (row_losses(*i2t, pos_i2t).mean() + row_losses(*t2i, pos_t2i).mean()) / 2
    return loss, accuracy(arg == torch.arange(x.shape[0], device=x.device) + offset)


def _simclr_loss(
    a: Tensor, b: Tensor, scale: Tensor, offset: int, ab: tuple, ba: tuple, aa: tuple, bb: tuple, kernel_positives: tuple = (None, None)
) -> tuple[Tensor, Tensor]:
    """(loss, accuracy) from the (lse, lost, max, argmax) of a.b_all, b.a_all, a.a_all, b.b_all;
    kernel_positives: the view-a and view-b rows' positive logits where the kernel computed them."""
    pos_a, pos_b = kernel_positives
    if pos_a is None or pos_b is None:
        pos_a = pos_b = positives(a, b) * scale  # (n,)
    loss_a = row_losses(*merge(ab[0], ab[1], aa[0], aa[1]), pos_a).mean()
    loss_b = row_losses(*merge(ba[0], ba[1], bb[0], bb[1]), pos_b).mean()
    # The reference's top-1 runs over [a.b_all | a.a_all]: a tie goes to the first half.
    correct = (ab[3] == torch.arange(a.shape[0], device=a.device) + offset) & (ab[2] >= aa[2])
    return (loss_a + loss_b) / 2, accuracy(correct)


def clip_from_rows(rows: RowsLSE, x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, logit_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """CLIP over this rank's rows from row log-sum-exps of its two strips (any world size)."""
    i2t = rows(x, y_all, logit_scale, positive_offset=offset)  # the positive of row i is candidate offset + i
    t2i = rows(y, x_all, logit_scale, positive_offset=offset)
    return _clip_loss(x, y, logit_scale, offset, i2t[:2], t2i[:2], i2t[3], (i2t[4], t2i[4]))


def simclr_from_rows(rows: RowsLSE, a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, temperature: float, offset: int) -> tuple[Tensor, Tensor]:
    """NT-Xent over this rank's rows from row log-sum-exps of its four strips (any world size)."""
    scale = torch.tensor([1.0 / temperature], dtype=row_dtype(a), device=a.device)
    ab, ba = rows(a, b_all, scale, positive_offset=offset), rows(b, a_all, scale, positive_offset=offset)
    aa, bb = rows(a, a_all, scale, mask_offset=offset), rows(b, b_all, scale, mask_offset=offset)
    return _simclr_loss(a, b, scale, offset, ab, ba, aa, bb, (ab[4], ba[4]))


def clip(x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, logit_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """CLIP InfoNCE over this rank's rows, as reference.clip, without the logits."""
    if x_all is x and y_all is y:  # one process: text-to-image rows are this matrix's columns
        i2t, i2t_lost, t2i, t2i_lost, _, arg = tiled_lse(x, y, logit_scale, cols=True)
        return _clip_loss(x, y, logit_scale, offset, (i2t, i2t_lost), (t2i, t2i_lost), arg)
    return clip_from_rows(_rows, x, y, x_all, y_all, logit_scale, offset)


def simclr(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, temperature: float, offset: int) -> tuple[Tensor, Tensor]:
    """NT-Xent as reference.simclr: view-a rows score b_all and a_all (own entry left out)."""
    if not (a_all is a and b_all is b):
        return simclr_from_rows(_rows, a, b, a_all, b_all, temperature, offset)
    # One process: b-rows against a are the columns of a . b^T, and a . a^T is symmetric,
    # so half its tiles suffice.
    scale = torch.tensor([1.0 / temperature], dtype=row_dtype(a), device=a.device)
    ab, ab_lost, ba, ba_lost, ab_max, ab_arg = tiled_lse(a, b, scale, cols=True)
    aa = _SymmetricTiledLSE.apply(a, scale, ROWS)  # (lse, lost, max)
    bb = _SymmetricTiledLSE.apply(b, scale, ROWS)
    return _simclr_loss(a, b, scale, offset, (ab, ab_lost, ab_max, ab_arg), (ba, ba_lost), aa, bb)
