"""The `triton` backend: the tiled log-sum-exp of `chunked` as fused Triton kernels.

Three kernels, as FlashAttention-2 splits its work:
- forward, one program per block of rows: the online max / sum / argmax over all column
  tiles of scale * p @ q.T, with each row's masked candidate at SELF_MASK_LOGIT; writes the
  row log-sum-exp, max and argmax, and the row's positive logit when asked for;
- backward for the rows, one program per block of rows: recomputes each tile, turns it into
  the softmax weighted by the incoming row gradient (plus the positive's incoming gradient
  at the positive), and accumulates p's gradient and a partial sum for the scale's;
- backward for the candidates, one program per block of columns: the same tiles, transposed,
  accumulate q's gradient.

The logits' products run in the inputs' dtype with fp32 accumulation: bf16 x bf16 on the
tensor cores (the API hands this backend bf16 unit vectors when the embeddings are bf16; a
product of two bf16 values is exact in fp32), fp32 as three TF32 products. Everything per
row (log-sum-exp, max, positive, the softmax weights, the gradient accumulators) is fp32.

The positive logit comes out of the same kernel, with gradient, so that d loss / d logit =
softmax - one-hot is formed per entry in fp32 before the products with the embeddings. When
the positive dominates, the two parts nearly cancel; added only after each had been rounded
to the embeddings' dtype (bf16: 8 bits), their difference would keep few correct bits.

The embedding width is walked in chunks of BLOCK_K, and a program's gradient rows are
accumulated in global memory chunk by chunk (each program owns its rows, so there are no
races). Under TRITON_INTERPRET=1 the same kernels run on the CPU, which is how the tests
check them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked import NO_MASK, clip_from_rows, row_dtype, simclr_from_rows
from .reference import SELF_MASK_LOGIT

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32
# fp32 products on tensor cores at about fp32 accuracy: three TF32 products per dot
# (Triton's default for fp32 is one TF32 product, 10 mantissa bits; "ieee" skips the cores).
PRECISION: tl.constexpr = tl.constexpr("tf32x3")
_MASK: tl.constexpr = tl.constexpr(SELF_MASK_LOGIT)  # a kernel reads module values only as constexpr
# Triton's interpreter multiplies bf16 operands of tl.dot as their raw uint16 bit patterns
# (triton-lang/triton#11584: "we just don't support it yet"); read, as @triton.jit reads it,
# when the kernels are defined.
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _logits(p_ptr, q_ptr, rows, cols, b, n, d, stride_p, stride_q, scale, mask_offset,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # (raw p.q^T, scaled logits with the masked entry and out-of-range columns set), fp32
    raw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_ptr + rows[:, None] * stride_p + ks[None, :], mask=(rows[:, None] < b) & (ks[None, :] < d), other=0.0)
        q = tl.load(q_ptr + cols[:, None] * stride_q + ks[None, :], mask=(cols[:, None] < n) & (ks[None, :] < d), other=0.0)
        if p.dtype == tl.float32:
            raw += tl.dot(p, tl.trans(q), input_precision=PRECISION)
        elif _INTERPRETED:  # the same products: a bf16 x bf16 product is exact in fp32
            raw += tl.dot(p.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:  # bf16 on the tensor cores, fp32 accumulation (input_precision is for fp32 only)
            raw += tl.dot(p, tl.trans(q))
    z = raw * scale
    z = tl.where(cols[None, :] == rows[:, None] + mask_offset, _MASK, z)
    z = tl.where(cols[None, :] < n, z, float("-inf"))
    return raw, z


@triton.jit
def _forward(p_ptr, q_ptr, scale_ptr, lse_ptr, lost_ptr, max_ptr, arg_ptr, pos_ptr, b, n, d, stride_p, stride_q,
             mask_offset, pos_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    run_arg = tl.zeros([BLOCK_M], dtype=tl.int64)
    run_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        _, z = _logits(p_ptr, q_ptr, rows, cols, b, n, d, stride_p, stride_q, scale, mask_offset, BLOCK_M, BLOCK_N, BLOCK_K)
        tile_max = tl.max(z, axis=1)
        tile_arg = tl.argmax(z, axis=1).to(tl.int64) + c0
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)  # the first maximum wins
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        run_pos += tl.sum(tl.where(cols[None, :] == rows[:, None] + pos_offset, z, 0.0), axis=1)
    ok = rows < b
    log_sum = tl.log(run_sum)
    lse = run_max + log_sum
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(lost_ptr + rows, (run_max - lse) + log_sum, mask=ok)  # what rounding lse lost
    tl.store(max_ptr + rows, run_max, mask=ok)
    tl.store(arg_ptr + rows, run_arg, mask=ok)
    tl.store(pos_ptr + rows, run_pos, mask=ok)


@triton.jit
def _weights(z, lse, g_row, g_pos, rows, cols, mask_offset, pos_offset):
    # d loss / d logit: row softmax times the row's incoming gradient, plus the positive's
    # incoming gradient at the positive, in fp32 (the two nearly cancel there); none for a
    # masked entry
    g = tl.exp(z - lse[:, None]) * g_row[:, None]
    g = tl.where(cols[None, :] == rows[:, None] + pos_offset, g + g_pos[:, None], g)
    return tl.where(cols[None, :] == rows[:, None] + mask_offset, 0.0, g)


@triton.jit
def _backward_rows(p_ptr, q_ptr, scale_ptr, lse_ptr, grow_ptr, gpos_ptr, gp_ptr, gscale_ptr, b, n, d, stride_p, stride_q,
                   mask_offset, pos_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=rows < b, other=0.0)
    g_row = tl.load(grow_ptr + rows, mask=rows < b, other=0.0)
    g_pos = tl.load(gpos_ptr + rows, mask=rows < b, other=0.0)
    scale_part = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        raw, z = _logits(p_ptr, q_ptr, rows, cols, b, n, d, stride_p, stride_q, scale, mask_offset, BLOCK_M, BLOCK_N, BLOCK_K)
        g = _weights(z, lse, g_row, g_pos, rows, cols, mask_offset, pos_offset)  # (M, N); 0 where cols >= n
        scale_part += tl.sum(g * raw, axis=1)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(q_ptr + cols[:, None] * stride_q + ks[None, :], mask=(cols[:, None] < n) & (ks[None, :] < d), other=0.0)
            at = gp_ptr + rows[:, None] * d + ks[None, :]
            keep = (rows[:, None] < b) & (ks[None, :] < d)
            tl.store(at, tl.load(at, mask=keep, other=0.0) + tl.dot(g, q.to(tl.float32), input_precision=PRECISION) * scale, mask=keep)
    tl.store(gscale_ptr + pid, tl.sum(scale_part, axis=0))


@triton.jit
def _backward_cols(p_ptr, q_ptr, scale_ptr, lse_ptr, grow_ptr, gpos_ptr, gq_ptr, b, n, d, stride_p, stride_q,
                   mask_offset, pos_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    for r0 in range(0, b, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_ptr + rows, mask=rows < b, other=0.0)
        g_row = tl.load(grow_ptr + rows, mask=rows < b, other=0.0)  # 0 past b: those rows add nothing
        g_pos = tl.load(gpos_ptr + rows, mask=rows < b, other=0.0)
        _, z = _logits(p_ptr, q_ptr, rows, cols, b, n, d, stride_p, stride_q, scale, mask_offset, BLOCK_M, BLOCK_N, BLOCK_K)
        g = _weights(z, lse, g_row, g_pos, rows, cols, mask_offset, pos_offset)  # (M, N)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            p = tl.load(p_ptr + rows[:, None] * stride_p + ks[None, :], mask=(rows[:, None] < b) & (ks[None, :] < d), other=0.0)
            at = gq_ptr + cols[:, None] * d + ks[None, :]
            keep = (cols[:, None] < n) & (ks[None, :] < d)
            tl.store(at, tl.load(at, mask=keep, other=0.0) + tl.dot(tl.trans(g), p.to(tl.float32), input_precision=PRECISION) * scale, mask=keep)


class _TritonLSE(torch.autograd.Function):
    """-> (row_lse [b], row_lost [b], row_max [b], row_argmax [b], positive [b]); the lse and
    the positive carry gradient."""

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor, scale: Tensor, mask_offset: int, pos_offset: int):  # type: ignore[override]
        p, q = p.contiguous(), q.contiguous()
        b, d = p.shape
        n = q.shape[0]
        lse = torch.empty(b, dtype=torch.float32, device=p.device)  # (b,)
        lost = torch.empty(b, dtype=torch.float32, device=p.device)  # (b,)
        row_max = torch.empty(b, dtype=torch.float32, device=p.device)  # (b,)
        row_arg = torch.empty(b, dtype=torch.int64, device=p.device)  # (b,)
        positive = torch.empty(b, dtype=torch.float32, device=p.device)  # (b,) 0 without a positive
        scale32 = scale.reshape(1).float()
        grid = (triton.cdiv(b, BLOCK_M),)
        _forward[grid](p, q, scale32, lse, lost, row_max, row_arg, positive, b, n, d, p.stride(0), q.stride(0),
                       mask_offset, pos_offset, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
        ctx.save_for_backward(p, q, scale, lse)
        ctx.mask_offset, ctx.pos_offset = mask_offset, pos_offset
        ctx.mark_non_differentiable(lost, row_max, row_arg)
        return lse, lost, row_max, row_arg, positive

    @staticmethod
    def backward(ctx, g_lse: Tensor, _g_lost: Tensor, _g_max: Tensor, _g_arg: Tensor, g_positive: Tensor):  # type: ignore[override]
        p, q, scale, lse = ctx.saved_tensors
        b, d = p.shape
        n = q.shape[0]
        g_row = g_lse.float().contiguous()
        g_pos = g_positive.float().contiguous()  # zeros when the positive was not used
        scale32 = scale.reshape(1).float()
        grad_p = torch.zeros(b, d, dtype=torch.float32, device=p.device)  # (b, d) fp32 accumulators
        grad_q = torch.zeros(n, d, dtype=torch.float32, device=p.device)  # (N, d)
        row_blocks = triton.cdiv(b, BLOCK_M)
        scale_parts = torch.zeros(row_blocks, dtype=torch.float32, device=p.device)  # (blocks,)
        args = (b, n, d, p.stride(0), q.stride(0), ctx.mask_offset, ctx.pos_offset)
        _backward_rows[(row_blocks,)](p, q, scale32, lse, g_row, g_pos, grad_p, scale_parts, *args,
                                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
        _backward_cols[(triton.cdiv(n, BLOCK_N),)](p, q, scale32, lse, g_row, g_pos, grad_q, *args,
                                                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
        grad_scale = scale_parts.sum().reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
        # p and q may have been cast from fp64 by tiled_lse; autograd casts the gradients back.
        return grad_p.to(p.dtype), grad_q.to(q.dtype), grad_scale, None, None


def tiled_lse(
    p: Tensor, q: Tensor, scale: Tensor, *, mask_offset: int | None = None, positive_offset: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(row_lse [b], row_lost [b], row_max [b], row_argmax [b], positive [b] or None) of
    Z = scale * p @ q.T, as chunked.tiled_lse computes its rows; positive_offset k asks for
    positive_i = Z[i, i + k], a function of p, q and scale like the lse (see the module's
    docstring for why it is computed here). p, q: fp32 or bf16 (the products' dtype; their
    gradients come back in it); fp64 (gradcheck's dtype) has no tensor-core dot and runs in
    fp32. The results are fp32, but for an fp64 positive: the loss keeps fp64 inputs' dtype."""
    if p.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton loss backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    if p.dtype != q.dtype:
        raise ValueError(f"p and q must share a dtype, got {p.dtype} and {q.dtype}")
    if positive_offset is not None and not (0 <= positive_offset <= q.shape[0] - p.shape[0] and positive_offset != mask_offset):
        raise ValueError(f"positive_offset {positive_offset} must index q's rows and differ from mask_offset {mask_offset}")
    positive_dtype = row_dtype(p)
    if p.dtype == torch.float64:
        p, q = p.float(), q.float()
    mask = NO_MASK if mask_offset is None else mask_offset
    pos = NO_MASK if positive_offset is None else positive_offset
    lse, lost, row_max, arg, positive = _TritonLSE.apply(p, q, scale.reshape(1), mask, pos)
    return lse, lost, row_max, arg, None if positive_offset is None else positive.to(positive_dtype)


def clip(x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, logit_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """CLIP InfoNCE over this rank's rows, as reference.clip, in fused kernels."""
    return clip_from_rows(tiled_lse, x, y, x_all, y_all, logit_scale, offset)


def simclr(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, temperature: float, offset: int) -> tuple[Tensor, Tensor]:
    """NT-Xent as reference.simclr, in fused kernels."""
    return simclr_from_rows(tiled_lse, a, b, a_all, b_all, temperature, offset)
