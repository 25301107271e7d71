"""Softmax over the last dim in float32: `torch.ops.fuser.softmax`, its Triton backward, its reference.

Stands for `F.softmax(x, -1)` and `F.softmax(x.float(), -1).to(dtype)` alike: float32 inside,
one rounding to `out_dtype`. A row that fits one block is read once; a longer row gets one
online pass (running max and running sum, block by block) and one pass that writes. -inf
entries behave as in torch: a row of only -inf gives NaN.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .language import exp, load_rows, program_rows, store_rows
from .runtime import (KernelLimits, RowTiling, Rows, any_sizes, as_rows, cdiv, entry_op, fused_op, kernels_apply,
                      known, launch)


LIMITS = KernelLimits()  # x in one of `dtypes`, the softmax in float32


@functools.lru_cache(maxsize=4096)  # cached: the host cost of a launch shows at small shapes
def forward_tiling(n_rows: int | None, n_cols: int | None) -> RowTiling:
    """Rows up to 16K elements stay in registers, longer ones loop over 16K blocks with 8 warps
    (H100 sweep at 32000 columns, RESULTS.md). None: a symbolic size (RowTiling.for_rows: rows of a symbolic
    length, the keys of a growing cache, are walked in 2K blocks)."""
    return RowTiling.for_rows(n_rows, n_cols, max_block_n=16384, max_warps=8)


@functools.lru_cache(maxsize=4096)
def backward_tiling(n_rows: int | None, n_cols: int | None) -> RowTiling:
    """Two tensors in, one out, not timed on its own yet: up to 8K columns in registers."""
    return RowTiling.for_rows(n_rows, n_cols, max_block_n=8192)


@triton.jit
def _row_statistics(x_rows, dy_rows, row_ok, block, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    WITH_SHIFT: tl.constexpr):
    """(max, 1 / sum of exp(x - max), dy where x is largest if WITH_SHIFT else 0) of rows longer than
    one block, in one online pass."""
    row_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    shift = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        x = load_rows(x_rows, row_ok, start + block, n_cols, -float("inf"), "evict_last")
        block_max = tl.max(x, axis=1)
        if WITH_SHIFT:
            dy = load_rows(dy_rows, row_ok, start + block, n_cols, 0.0, "evict_last")
            shift = tl.where(block_max > row_max, _dy_at_max(x, dy, block_max), shift)
        new_max = tl.maximum(row_max, block_max)
        # Subtract 0 while everything so far is -inf, so the sum stays 0 instead of NaN (-inf - -inf).
        offset = tl.where(new_max == -float("inf"), 0.0, new_max)
        row_sum = row_sum * exp(row_max - offset) + tl.sum(exp(x - offset[:, None]), axis=1)
        row_max = new_max
    return row_max, 1.0 / row_sum, shift


@triton.jit
def _dy_at_max(x, dy, row_max):
    """dy at the largest x of each row (the largest of them where x ties)."""
    return tl.max(tl.where(x == row_max[:, None], dy, -float("inf")), axis=1)


@triton.jit
def _softmax_forward_kernel(x_ptr, out_ptr, n_rows, n_cols, x_row_stride, out_row_stride, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, ROW_FITS: tl.constexpr):
    rows, row_ok = program_rows(n_rows, BLOCK_M)
    x_rows = x_ptr + rows * x_row_stride
    out_rows = out_ptr + rows * out_row_stride
    block = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        x = load_rows(x_rows, row_ok, block, n_cols, -float("inf"), "")
        e = exp(x - tl.max(x, axis=1)[:, None])
        store_rows(out_rows, row_ok, block, n_cols, e * (1.0 / tl.sum(e, axis=1))[:, None])
    else:
        row_max, inverse_sum, _ = _row_statistics(x_rows, x_rows, row_ok, block, n_cols, BLOCK_M, BLOCK_N, False)
        for start in range(0, n_cols, BLOCK_N):
            x = load_rows(x_rows, row_ok, start + block, n_cols, -float("inf"), "evict_first")
            store_rows(out_rows, row_ok, start + block, n_cols,
                        exp(x - row_max[:, None]) * inverse_sum[:, None])


@triton.jit
def _softmax_backward_kernel(dy_ptr, x_ptr, dx_ptr, n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_FITS: tl.constexpr):
    """dx = y * ((dy - c) - Σ (dy - c)·y) for c = dy at the row's largest x, with y recomputed from x
    in float32 (see `softmax_backward_reference`). A saved y rounded to a 16-bit output loses what the
    subtraction cancels (near one-hot rows), where the upcast original keeps float32."""
    rows, row_ok = program_rows(n_rows, BLOCK_M)
    dy_rows = dy_ptr + rows * dy_row_stride
    x_rows = x_ptr + rows * x_row_stride
    dx_rows = dx_ptr + rows * dx_row_stride
    block = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        dy = load_rows(dy_rows, row_ok, block, n_cols, 0.0, "")
        x = load_rows(x_rows, row_ok, block, n_cols, -float("inf"), "")
        row_max = tl.max(x, axis=1)
        e = exp(x - row_max[:, None])
        y = e * (1.0 / tl.sum(e, axis=1))[:, None]
        dy = dy - _dy_at_max(x, dy, row_max)[:, None]
        store_rows(dx_rows, row_ok, block, n_cols, y * (dy - tl.sum(dy * y, axis=1)[:, None]))
    else:
        row_max, inverse_sum, shift = _row_statistics(x_rows, dy_rows, row_ok, block, n_cols, BLOCK_M, BLOCK_N,
                                                      True)
        dot = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            dy = load_rows(dy_rows, row_ok, start + block, n_cols, 0.0, "evict_last") - shift[:, None]
            x = load_rows(x_rows, row_ok, start + block, n_cols, -float("inf"), "evict_last")
            dot += tl.sum(dy * exp(x - row_max[:, None]) * inverse_sum[:, None], axis=1)
        for start in range(0, n_cols, BLOCK_N):
            dy = load_rows(dy_rows, row_ok, start + block, n_cols, 0.0, "evict_first") - shift[:, None]
            x = load_rows(x_rows, row_ok, start + block, n_cols, -float("inf"), "evict_first")
            y = exp(x - row_max[:, None]) * inverse_sum[:, None]
            store_rows(dx_rows, row_ok, start + block, n_cols, y * (dy - dot[:, None]))


def softmax_forward_launch(x: torch.Tensor, out_dtype: torch.dtype, tiling: RowTiling | None = None) -> torch.Tensor:
    """Launch the forward kernel (`tiling` defaults to the tuned heuristic; tests and sweeps pass their own)."""
    rows = as_rows(x)
    n_rows, n_cols = rows.shape
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    tiling = tiling or forward_tiling(known(n_rows), known(n_cols))
    launch(_softmax_forward_kernel, (cdiv(n_rows, tiling.block_m),), ("softmax.forward", n_rows, n_cols),
        rows, out, n_rows, n_cols, rows.stride(0), out.stride(0), BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
        ROW_FITS=tiling.fits(n_cols), num_warps=tiling.num_warps)
    return out.view(x.shape)


def softmax_backward_launch(grad_out: torch.Tensor, x: torch.Tensor, tiling: RowTiling | None = None) -> torch.Tensor:
    """Launch the backward kernel; dx comes back in x's dtype."""
    grad_rows, x_rows = as_rows(grad_out), as_rows(x)
    n_rows, n_cols = x_rows.shape
    dx = torch.empty(x_rows.shape, dtype=x.dtype, device=x.device)
    tiling = tiling or backward_tiling(known(n_rows), known(n_cols))
    launch(_softmax_backward_kernel, (cdiv(n_rows, tiling.block_m),), ("softmax.backward", n_rows, n_cols),
        grad_rows, x_rows, dx, n_rows, n_cols, grad_rows.stride(0), x_rows.stride(0), dx.stride(0),
        BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, ROW_FITS=tiling.fits(n_cols), num_warps=tiling.num_warps)
    return dx.view(x.shape)


def softmax_reference(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """What the op stands for: softmax in float32 (float64 for float64 inputs), one cast."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.softmax(x.to(compute), -1).to(out_dtype)


def softmax_backward_reference(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y·(dy − Σdy·y), as y·((dy − c) − Σ(dy − c)·y) for c = dy at the row's largest x: the same in
    exact arithmetic (Σy = 1), and Σ(dy − c)·y no longer cancels where one y dominates or dy is
    nearly constant (float32 rows measured 1e4x closer to float64 than torch's formula there)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y, dy = torch.softmax(x.to(compute), -1), grad_out.to(compute)
    dy = dy - dy.gather(-1, x.argmax(-1, keepdim=True))
    return (y * (dy - (dy * y).sum(-1, keepdim=True))).to(x.dtype)


# The ops (kernels/runtime/ops.py): fuser::softmax over fuser::softmax_forward, fuser::softmax_backward

def _backward_kernel(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dx = y * (grad_out - Σ grad_out·y) for y = softmax(x) in float32, in x's dtype."""
    return softmax_backward_launch(grad_out, x)


def _backward_reference(grad_out, x):
    return softmax_backward_reference(grad_out, x).contiguous()


def _backward_fake(grad_out, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_call_backward = fused_op("softmax_backward", _backward_kernel, _backward_reference, _backward_fake,
                          lambda grad_out, x: kernels_apply(grad_out, x, out_dtype=x.dtype), rows=Rows(args=(0, 1)),
                          symbolic=any_sizes)


def _forward_kernel(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return softmax_forward_launch(x, out_dtype)


def _forward_reference(x, out_dtype):
    return softmax_reference(x, out_dtype).contiguous()


def _forward_fake(x, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    # x, not y: the backward recomputes y in float32 (a 16-bit y would lose what its subtraction cancels),
    # for the bytes a saved y would take
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _call_backward(grad_out, x), None


_call_forward = fused_op("softmax_forward", _forward_kernel, _forward_reference, _forward_fake,
                         lambda x, out_dtype: kernels_apply(x, out_dtype=out_dtype),
                         setup_context=_setup_context, backward=_backward, rows=Rows(args=(0,)), symbolic=any_sizes)


@entry_op
def softmax(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim, float32 inside, result in `out_dtype`."""
    return _call_forward(x, out_dtype)
