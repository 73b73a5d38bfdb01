"""The `triton` backend: the tiled log-sum-exp of `chunked` as fused Triton kernels, shaped for Hopper.

Three kernels, as FlashAttention-2 splits its work, each over a grid that fills the GPU:
- forward, one program per (block of rows, slice of the columns): the online max / sum /
  argmax of its tiles of scale * p @ q.T, with each row's masked candidate at
  SELF_MASK_LOGIT, and the row's positive logit when asked for. The slices' partial results
  are merged in a small second pass (`_merge`), exactly: max, rescaled sums, the first argmax.
- backward for the rows, one program per (block of rows, slice of the embedding width, slice
  of the columns): recomputes its tiles, turns each into the softmax weighted by the incoming
  row gradient (plus the positive's incoming gradient at the positive), and accumulates its
  slice of p's gradient in registers across the whole column loop, stored once; also the
  rows' partial sums for the scale's gradient.
- backward for the candidates: the same with rows and columns exchanged, for q's gradient.
Slices of the columns (rows) write partial gradients that are summed afterwards, so no
program reads what another writes: no atomics, no read-modify-write; one configuration gives
the same bits every run. The autotuner picks the configuration by timing, once per size, and
keeps its pick in Triton's cache (`cache_results`), so later runs on the machine take the same.

Precision. The logits' products run in the inputs' dtype with fp32 accumulation: bf16 x bf16
on the tensor cores (the API hands this backend bf16 unit vectors when the embeddings are
bf16; a product of two bf16 values is exact in fp32), fp32 as three TF32 products (fp32
accuracy). d loss / d logit is formed per entry in fp32 (the positive is computed in the
same kernel, with gradient: when the positive dominates, softmax and one-hot nearly cancel,
and only their fp32 difference keeps its digits); for bf16 inputs it then enters the
gradient products as one bf16 rounding, a bf16 x bf16 dot with fp32 accumulation.

Tiles. Compiled, the kernels are autotuned over a few Hopper configurations (128- or 64-row
tiles, 8 warps, whose dots lower to wgmma). Under Triton's interpreter (TRITON_INTERPRET, as
triton itself reads it) the same kernels run on the CPU with small tiles, so the tests' small
batches cross several blocks and slices; bf16 dots there run as the exact fp32 products of
the bf16 values, the interpreter having no bf16 dot of its own (triton-lang/triton#11584).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked import NO_MASK, clip_from_rows, row_dtype, simclr_from_rows
from .reference import SELF_MASK_LOGIT

# fp32 products on tensor cores at about fp32 accuracy: three TF32 products per dot
# (Triton's default for fp32 is one TF32 product, 10 mantissa bits; "ieee" skips the cores).
PRECISION: tl.constexpr = tl.constexpr("tf32x3")
_MASK: tl.constexpr = tl.constexpr(SELF_MASK_LOGIT)  # a kernel reads module values only as constexpr
INTERPRETED = bool(triton.knobs.runtime.interpret)  # read as @triton.jit reads it, when the kernels are defined
_INTERPRETED: tl.constexpr = tl.constexpr(INTERPRETED)
TARGET_PROGRAMS = 264  # two per SM of an H100/H200: slices of the columns (rows) are added until the grid has this many

# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D): rows x columns per tile, the width walked per dot, the
# width of gradient a backward program owns (its fp32 accumulator stays in registers). Compiled,
# the autotuner picks among CONFIGS[kernel][dtype]: each compiles for sm_90 to wgmma without
# spilling a register (tests/unit/kernels/test_triton_compiles.py reads ptxas's report). fp32
# takes smaller tiles: its three TF32 products per dot hold three times the operands.
INTERPRETED_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}
_C = triton.Config
CONFIGS = {
    "forward": {
        torch.bfloat16: [_C({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
                         _C({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
                         _C({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3)],
        torch.float32: [_C({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
                        _C({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3)],
    },
    "backward": {
        torch.bfloat16: [_C({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
                         _C({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 256}, num_warps=8, num_stages=2)],
        torch.float32: [_C({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=8, num_stages=2),
                        _C({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 128}, num_warps=8, num_stages=2)],
    },
}  # fmt: skip
SLICE_ALIGN = 128  # slices of columns (rows) start at multiples of every config's BLOCK_N (BLOCK_M)


@triton.jit
def _logits(p_ptr, q_ptr, rows, cols, b, end, d, stride_p, stride_q, scale, mask_offset,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # (raw p.q^T, scaled logits with the masked entry set and columns at or past `end` at -inf), fp32
    raw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    p_rows = rows.to(tl.int64)[:, None] * stride_p  # int64: rows * stride passes 2^31 at large batches
    q_rows = cols.to(tl.int64)[:, None] * stride_q
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_ptr + p_rows + ks[None, :], mask=(rows[:, None] < b) & (ks[None, :] < d), other=0.0)
        q = tl.load(q_ptr + q_rows + ks[None, :], mask=(cols[:, None] < end) & (ks[None, :] < d), other=0.0)
        if p.dtype == tl.float32:
            raw += tl.dot(p, tl.trans(q), input_precision=PRECISION)
        elif _INTERPRETED:  # the same products: a bf16 x bf16 product is exact in fp32
            raw += tl.dot(p.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:  # bf16 on the tensor cores, fp32 accumulation (input_precision is for fp32 only)
            raw += tl.dot(p, tl.trans(q))
    z = raw * scale
    z = tl.where(cols[None, :] == rows[:, None] + mask_offset, _MASK, z)
    z = tl.where(cols[None, :] < end, z, float("-inf"))
    return raw, z


@triton.jit
def _forward(p_ptr, q_ptr, scale_ptr, max_ptr, sum_ptr, arg_ptr, pos_ptr, b, n, d, stride_p, stride_q, span,
             mask_offset, pos_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    part = tl.program_id(1)  # this program's slice of the columns: [part * span, (part + 1) * span)
    start = part * span
    end = tl.minimum(n, start + span)
    scale = tl.load(scale_ptr).to(tl.float32)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    run_arg = tl.zeros([BLOCK_M], dtype=tl.int64)
    run_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        _, z = _logits(p_ptr, q_ptr, rows, cols, b, end, d, stride_p, stride_q, scale, mask_offset, BLOCK_M, BLOCK_N, BLOCK_K)
        tile_max = tl.max(z, axis=1)
        tile_arg = tl.argmax(z, axis=1).to(tl.int64) + c0
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)  # the first maximum wins
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        run_pos += tl.sum(tl.where((cols[None, :] == rows[:, None] + pos_offset) & (cols[None, :] < end), z, 0.0), axis=1)
    at = part.to(tl.int64) * b + rows
    ok = rows < b
    tl.store(max_ptr + at, run_max, mask=ok)
    tl.store(sum_ptr + at, run_sum, mask=ok)
    tl.store(arg_ptr + at, run_arg, mask=ok)
    tl.store(pos_ptr + at, run_pos, mask=ok)


@triton.jit
def _weights(z, lse, g_row, g_pos, rows, cols, mask_offset, pos_offset):
    # d loss / d logit: row softmax times the row's incoming gradient, plus the positive's
    # incoming gradient at the positive, in fp32 (the two nearly cancel there); none for a
    # masked entry, nor past the slice (z = -inf there)
    g = tl.exp(z - lse[:, None]) * g_row[:, None]
    g = tl.where(cols[None, :] == rows[:, None] + pos_offset, g + g_pos[:, None], g)
    return tl.where(cols[None, :] == rows[:, None] + mask_offset, 0.0, g)


@triton.jit
def _grad_dot(g, e):
    # g [M, N] fp32 times e [N, D] (the embeddings' dtype) with fp32 accumulation: g rounded
    # once to bf16 for bf16 embeddings, three TF32 products for fp32 ones
    if e.dtype == tl.float32:
        return tl.dot(g, e, input_precision=PRECISION)
    if _INTERPRETED:  # what the tensor cores compute, in exact fp32 products
        return tl.dot(g.to(tl.bfloat16).to(tl.float32), e.to(tl.float32), input_precision="ieee")
    return tl.dot(g.to(e.dtype), e)


@triton.jit
def _backward_rows(p_ptr, q_ptr, scale_ptr, lse_ptr, grow_ptr, gpos_ptr, gp_ptr, gscale_ptr, b, n, d, stride_p, stride_q, span,
                   mask_offset, pos_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's slice of p's gradient
    part = tl.program_id(2)
    start = part * span
    end = tl.minimum(n, start + span)
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=rows < b, other=0.0)
    g_row = tl.load(grow_ptr + rows, mask=rows < b, other=0.0)
    g_pos = tl.load(gpos_ptr + rows, mask=rows < b, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # in registers across the whole column loop
    scale_part = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        raw, z = _logits(p_ptr, q_ptr, rows, cols, b, end, d, stride_p, stride_q, scale, mask_offset, BLOCK_M, BLOCK_N, BLOCK_K)
        g = _weights(z, lse, g_row, g_pos, rows, cols, mask_offset, pos_offset)  # (M, N)
        scale_part += tl.sum(g * raw, axis=1)
        q = tl.load(q_ptr + cols.to(tl.int64)[:, None] * stride_q + dims[None, :], mask=(cols[:, None] < end) & (dims[None, :] < d), other=0.0)
        acc += _grad_dot(g, q)
    at = part.to(tl.int64) * b + rows
    tl.store(gp_ptr + at[:, None] * d + dims[None, :], acc * scale, mask=(rows[:, None] < b) & (dims[None, :] < d))
    tl.store(gscale_ptr + at, scale_part, mask=(rows < b) & (tl.program_id(1) == 0))  # once per row, not per slice of d


@triton.jit
def _backward_cols(p_ptr, q_ptr, scale_ptr, lse_ptr, grow_ptr, gpos_ptr, gq_ptr, b, n, d, stride_p, stride_q, span,
                   mask_offset, pos_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr):  # fmt: skip
    # BLOCK_M here counts candidates (this program's columns) and BLOCK_N the rows it walks.
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    part = tl.program_id(2)  # this program's slice of the rows
    start = part * span
    end = tl.minimum(b, start + span)
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        lse = tl.load(lse_ptr + rows, mask=rows < end, other=0.0)
        g_row = tl.load(grow_ptr + rows, mask=rows < end, other=0.0)  # 0 past the slice: those rows add nothing
        g_pos = tl.load(gpos_ptr + rows, mask=rows < end, other=0.0)
        _, z = _logits(p_ptr, q_ptr, rows, cols, end, n, d, stride_p, stride_q, scale, mask_offset, BLOCK_N, BLOCK_M, BLOCK_K)
        g = _weights(z, lse, g_row, g_pos, rows, cols, mask_offset, pos_offset)  # (rows N, cols M)
        p = tl.load(p_ptr + rows.to(tl.int64)[:, None] * stride_p + dims[None, :], mask=(rows[:, None] < end) & (dims[None, :] < d), other=0.0)
        acc += _grad_dot(tl.trans(g), p)
    at = part.to(tl.int64) * n + cols
    tl.store(gq_ptr + at[:, None] * d + dims[None, :], acc * scale, mask=(cols[:, None] < n) & (dims[None, :] < d))


def _tuned(kernel, stage: str) -> dict:
    """Per embedding dtype, the kernel autotuned over its CONFIGS (keyed by the sizes that change
    the best tiles), or as it is under the interpreter, where the launch names its small tiles."""
    if INTERPRETED:
        return {dtype: kernel for dtype in CONFIGS[stage]}
    return {dtype: triton.autotune(configs, key=["b", "n", "d"], cache_results=True)(kernel) for dtype, configs in CONFIGS[stage].items()}


_FORWARD = _tuned(_forward, "forward")
_BACKWARD_ROWS = _tuned(_backward_rows, "backward")
_BACKWARD_COLS = _tuned(_backward_cols, "backward")


def _blocks(*names: str) -> dict[str, int]:
    return {k: INTERPRETED_BLOCKS[k] for k in names} if INTERPRETED else {}


def _slices(length: int, programs: int) -> tuple[int, int]:
    """(number of slices, slice length) that `length` columns (rows) are cut into so that
    `programs` programs per slice make about TARGET_PROGRAMS; slices start on tile boundaries."""
    # Interpreted, two tiles per slice: the tests cross tiles within a slice as well as slices.
    align = 2 * INTERPRETED_BLOCKS["BLOCK_N"] if INTERPRETED else SLICE_ALIGN
    wanted = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(programs, 1)), triton.cdiv(length, align)))
    span = triton.cdiv(triton.cdiv(length, wanted), align) * align
    return triton.cdiv(length, span), span


def _on(device: torch.device):
    """Launches go to the tensors' GPU, whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _merge(part_max: Tensor, part_sum: Tensor, part_arg: Tensor, part_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The column slices' partial results [slices, b] as one: (lse, lost, max, argmax, positive) [b].
    Exact: the running max, the sums rescaled to it, the argmax of the first slice that holds
    the max (the first maximum wins, as within a slice), the positive from the slice that has it."""
    row_max = part_max.max(dim=0).values  # (b,)
    row_sum = (part_sum * torch.exp(part_max - row_max)).sum(dim=0)  # (b,) a slice of -inf adds 0
    first = (part_max == row_max).to(torch.int8).argmax(dim=0, keepdim=True)  # (1, b)
    log_sum = torch.log(row_sum)
    lse = row_max + log_sum
    return lse, (row_max - lse) + log_sum, row_max, part_arg.gather(0, first)[0], part_pos.sum(dim=0)


class _TritonLSE(torch.autograd.Function):
    """-> (row_lse [b], row_lost [b], row_max [b], row_argmax [b], positive [b]); the lse and
    the positive carry gradient."""

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor, scale: Tensor, mask_offset: int, pos_offset: int):  # type: ignore[override]
        p, q = p.contiguous(), q.contiguous()
        b, d = p.shape
        n = q.shape[0]
        parts, span = _slices(n, triton.cdiv(b, 128))
        part_max = torch.empty(parts, b, dtype=torch.float32, device=p.device)  # (slices, b) each
        part_sum, part_pos = torch.empty_like(part_max), torch.empty_like(part_max)
        part_arg = torch.empty(parts, b, dtype=torch.int64, device=p.device)
        scale32 = scale.reshape(1).float()
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), parts)  # noqa: E731
        with _on(p.device):
            _FORWARD[p.dtype][grid](p, q, scale32, part_max, part_sum, part_arg, part_pos, b, n, d, p.stride(0), q.stride(0), span,
                           mask_offset, pos_offset, **_blocks("BLOCK_M", "BLOCK_N", "BLOCK_K"))  # fmt: skip
        lse, lost, row_max, row_arg, positive = _merge(part_max, part_sum, part_arg, part_pos)
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
        d_slices = triton.cdiv(d, 256)  # the fewest slices any configuration cuts the width into
        args = (b, n, d, p.stride(0), q.stride(0))
        row_parts, row_span = _slices(n, triton.cdiv(b, 128) * d_slices)  # slices of the columns for p's gradient
        col_parts, col_span = _slices(b, triton.cdiv(n, 128) * d_slices)  # slices of the rows for q's gradient
        grad_p = torch.empty(row_parts, b, d, dtype=torch.float32, device=p.device)  # (slices, b, d) partial sums
        grad_q = torch.empty(col_parts, n, d, dtype=torch.float32, device=p.device)  # (slices, N, d)
        scale_parts = torch.empty(row_parts, b, dtype=torch.float32, device=p.device)  # (slices, b)
        blocks = _blocks("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D")
        with _on(p.device):
            _BACKWARD_ROWS[p.dtype][lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]), row_parts)](
                p, q, scale32, lse, g_row, g_pos, grad_p, scale_parts, *args, row_span, ctx.mask_offset, ctx.pos_offset, **blocks)
            _BACKWARD_COLS[p.dtype][lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]), col_parts)](
                p, q, scale32, lse, g_row, g_pos, grad_q, *args, col_span, ctx.mask_offset, ctx.pos_offset, **blocks)
        grad_scale = scale_parts.sum().reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
        # p and q may have been cast from fp64 by tiled_lse; autograd casts the gradients back.
        return grad_p.sum(dim=0).to(p.dtype), grad_q.sum(dim=0).to(q.dtype), grad_scale, None, None


def tiled_lse(
    p: Tensor, q: Tensor, scale: Tensor, *, mask_offset: int | None = None, positive_offset: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(row_lse [b], row_lost [b], row_max [b], row_argmax [b], positive [b] or None) of
    Z = scale * p @ q.T, as chunked.tiled_lse computes its rows; positive_offset k asks for
    positive_i = Z[i, i + k], a function of p, q and scale like the lse (see the module's
    docstring for why it is computed here). p, q: fp32 or bf16 (the products' dtype; their
    gradients come back in it); fp64 (gradcheck's dtype) has no tensor-core dot and runs in
    fp32. The results are fp32, but for an fp64 positive: the loss keeps fp64 inputs' dtype."""
    if p.device.type != "cuda" and not INTERPRETED:
        raise ValueError("the triton loss backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    if p.dtype != q.dtype:
        raise ValueError(f"p and q must share a dtype, got {p.dtype} and {q.dtype}")
    if p.device != q.device:
        raise ValueError(f"p and q must be on one device, got {p.device} and {q.device}")
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
