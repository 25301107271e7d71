"""RMSNorm in one pass over the input: `torch.ops.fuser.rms_norm`, its Triton backward, its reference.

One op covers transformers' RMSNorm forms, told apart by two literals:
- `weight_before_cast=True`: the weight multiplies in float32, then one cast (Gemma with
  `weight_offset=1.0`, Olmo2 with 0);
- `weight_before_cast=False`: the normalized value is rounded to the input dtype first and
  multiplied by `weight_offset + weight` in the promoted dtype (Llama: `weight * h.to(input_dtype)`).
The kernels round where that code rounds, so they agree with it, not only with float64.

Rows longer than one block loop over column blocks (two passes over x); shorter rows are held
in registers, several rows per program when rows are short. The weight gradient is reduced
without atomics: each program of the backward keeps its rows' partial sums and writes one row of
a [programs, N] float32 buffer, which a second small kernel sums column block by column block.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .language import load_rows, program_rows, store_rows, to_dtype
from .runtime import (KernelLimits, RowTiling, Rows, any_sizes, as_rows, bounded, cdiv, entry_op, fused_op,
                      kernels_apply, known, launch, next_pow2, program_slots)

TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Row machinery shared with softmax.py: tiling, the [rows, N] view, when to launch, block loads and stores.

LIMITS = KernelLimits()  # x and the weight each in one of `dtypes`, normalized in float32


@functools.lru_cache(maxsize=4096)  # cached: the host cost of a launch shows at small shapes
def forward_tiling(n_rows: int | None, n_cols: int | None) -> RowTiling:
    """Rows up to 16K elements stay in registers, 32 elements per thread; up to 8K columns two rows
    (or more, for 4K elements) share a program and its load of the weight (H100 sweep, RESULTS.md).
    None: a symbolic size (RowTiling.for_rows)."""
    block_n = min(next_pow2(n_cols), 16384) if n_cols is not None else 2048
    min_tile = max(4096, 2 * block_n) if block_n <= 8192 else block_n
    return RowTiling.for_rows(n_rows, n_cols, max_block_n=16384, min_tile=min_tile, elements_per_thread=32)


@functools.lru_cache(maxsize=4096)
def backward_tiling(n_rows: int | None, n_cols: int | None) -> RowTiling:
    """x, dy, g and the weight-gradient sums live together. Up to 4K columns, 64 elements per thread
    (two programs per SM, ~250 registers) measured fastest on H100; wider rows take 32 so as not to spill."""
    if n_cols is not None and n_cols <= 4096:
        return RowTiling.for_rows(n_rows, n_cols, max_block_n=4096, min_tile=8192, elements_per_thread=64)
    return RowTiling.for_rows(n_rows, n_cols, max_block_n=8192, elements_per_thread=32)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_weight(w_ptr, cols, n_cols, HAS_WEIGHT: tl.constexpr):
    """The weight at `cols` as float32 (0 without one), kept in L2 for the other programs."""
    w = 0.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return w


@triton.jit
def _normalize_and_store(x, rstd, out_rows, row_ok, cols, n_cols, w, w_ptr, weight_offset, HAS_WEIGHT: tl.constexpr,
                         WEIGHT_BEFORE_CAST: tl.constexpr, INPUT_DTYPE: tl.constexpr, PRODUCT_DTYPE: tl.constexpr):
    """Write one block of the output, rounding where the mirrored code rounds (`w` from `_load_weight`)."""
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        if WEIGHT_BEFORE_CAST:
            y = y * (weight_offset + w)[None, :]
        else:
            scale = to_dtype(weight_offset + w, w_ptr.dtype.element_ty).to(tl.float32)
            y = to_dtype(to_dtype(y, INPUT_DTYPE).to(tl.float32) * scale[None, :], PRODUCT_DTYPE)
    store_rows(out_rows, row_ok, cols, n_cols, y)


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, x_row_stride, out_row_stride, eps,
                             weight_offset, HAS_WEIGHT: tl.constexpr, WEIGHT_BEFORE_CAST: tl.constexpr,
                             INPUT_DTYPE: tl.constexpr, PRODUCT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, ROW_FITS: tl.constexpr):
    eps, weight_offset = tl.cast(eps, tl.float32), tl.cast(weight_offset, tl.float32)  # Inductor passes floats as fp64
    rows, row_ok = program_rows(n_rows, BLOCK_M)
    x_rows = x_ptr + rows * x_row_stride
    out_rows = out_ptr + rows * out_row_stride
    block = tl.arange(0, BLOCK_N)
    if ROW_FITS:
        x = load_rows(x_rows, row_ok, block, n_cols, 0.0, "")
        w = _load_weight(w_ptr, block, n_cols, HAS_WEIGHT)  # issued before the sum: its latency hides behind x's
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        _normalize_and_store(x, rstd, out_rows, row_ok, block, n_cols, w, w_ptr, weight_offset, HAS_WEIGHT,
                             WEIGHT_BEFORE_CAST, INPUT_DTYPE, PRODUCT_DTYPE)
    else:  # two passes; the first keeps x in L2 for the second
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            x = load_rows(x_rows, row_ok, start + block, n_cols, 0.0, "evict_last")
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            x = load_rows(x_rows, row_ok, start + block, n_cols, 0.0, "evict_first")
            w = _load_weight(w_ptr, start + block, n_cols, HAS_WEIGHT)
            _normalize_and_store(x, rstd, out_rows, row_ok, start + block, n_cols, w, w_ptr, weight_offset,
                                 HAS_WEIGHT, WEIGHT_BEFORE_CAST, INPUT_DTYPE, PRODUCT_DTYPE)


def rms_norm_forward_launch(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float,
                     weight_before_cast: bool, out_dtype: torch.dtype, tiling: RowTiling | None = None) -> torch.Tensor:
    """Launch the forward kernel (`tiling` defaults to the tuned heuristic; tests and sweeps pass their own)."""
    rows = as_rows(x)
    n_rows, n_cols = rows.shape
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    tiling = tiling or forward_tiling(known(n_rows), known(n_cols))
    product_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    launch(_rms_norm_forward_kernel, (cdiv(n_rows, tiling.block_m),), ("rms_norm.forward", n_rows, n_cols),
        rows, weight, out, n_rows, n_cols, rows.stride(0), out.stride(0), eps, weight_offset,
        HAS_WEIGHT=weight is not None, WEIGHT_BEFORE_CAST=weight_before_cast, INPUT_DTYPE=TRITON_DTYPES[x.dtype],
        PRODUCT_DTYPE=TRITON_DTYPES[product_dtype], BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
        ROW_FITS=tiling.fits(n_cols), num_warps=tiling.num_warps)
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Backward: dx = rstd * (g - y * mean(g * y)) with g = dy * (offset + w), y = x * rstd; dw = Σ_rows dy * y
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grad_block(dy_rows, x_rows, row_ok, cols, n_cols, w_ptr, weight_offset, HAS_WEIGHT: tl.constexpr):
    """(x, dy, g) of one block in float32, g being the gradient reaching the normalized value."""
    x = load_rows(x_rows, row_ok, cols, n_cols, 0.0, "")
    dy = load_rows(dy_rows, row_ok, cols, n_cols, 0.0, "")
    g = dy
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0, eviction_policy="evict_last").to(tl.float32)
        g = dy * (weight_offset + w)[None, :]
    return x, dy, g


@triton.jit
def _store_grad_input(dx_rows, row_ok, cols, n_cols, x, g, rstd, mean_gx):
    store_rows(dx_rows, row_ok, cols, n_cols, rstd[:, None] * (g - x * (rstd * rstd * mean_gx)[:, None]))


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols, dy_row_stride,
                              x_row_stride, dx_row_stride, eps, weight_offset, HAS_WEIGHT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_FITS: tl.constexpr,
                              NUM_STAGES: tl.constexpr):
    """Persistent: program p takes row tiles p, p + programs, ... and owns row p of the partial buffer."""
    eps, weight_offset = tl.cast(eps, tl.float32), tl.cast(weight_offset, tl.float32)  # Inductor passes floats as fp64
    program = tl.program_id(0)
    block = tl.arange(0, BLOCK_N)
    dw_partial_row = dw_partial_ptr + program * n_cols
    dw_sum = tl.zeros([BLOCK_N], tl.float32)
    for tile in tl.range(program, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=NUM_STAGES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
        dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * dy_row_stride
        dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * dx_row_stride
        if ROW_FITS:
            x, dy, g = _grad_block(dy_rows, x_rows, row_ok, block, n_cols, w_ptr, weight_offset, HAS_WEIGHT)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
            _store_grad_input(dx_rows, row_ok, block, n_cols, x, g, rstd, tl.sum(g * x, axis=1) / n_cols)
            dw_sum += tl.sum(dy * x * rstd[:, None], axis=0)
        else:
            sum_sq = tl.zeros([BLOCK_M], tl.float32)
            sum_gx = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                x, dy, g = _grad_block(dy_rows, x_rows, row_ok, start + block, n_cols, w_ptr, weight_offset,
                                       HAS_WEIGHT)
                sum_sq += tl.sum(x * x, axis=1)
                sum_gx += tl.sum(g * x, axis=1)
            rstd = tl.rsqrt(sum_sq / n_cols + eps)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + block
                x, dy, g = _grad_block(dy_rows, x_rows, row_ok, cols, n_cols, w_ptr, weight_offset, HAS_WEIGHT)
                _store_grad_input(dx_rows, row_ok, cols, n_cols, x, g, rstd, sum_gx / n_cols)
                if HAS_WEIGHT:  # this program's own row of the buffer: no other program touches it
                    partial = tl.load(dw_partial_row + cols, mask=cols < n_cols, other=0.0)
                    tl.store(dw_partial_row + cols, partial + tl.sum(dy * x * rstd[:, None], axis=0),
                             mask=cols < n_cols)
    if ROW_FITS and HAS_WEIGHT:
        tl.store(dw_partial_row + block, dw_sum, mask=block < n_cols)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[c] = Σ_p partial[p, c], one column block per program."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & (cols < n_cols)[None, :]
        acc += tl.sum(tl.load(partial_ptr + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + cols, to_dtype(acc, out_ptr.dtype.element_ty), mask=cols < n_cols)


def rms_norm_backward_launch(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                             weight_offset: float, tiling: RowTiling | None = None, programs_per_slot: int = 2,
                             num_stages: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. `tiling` and `programs_per_slot` (persistent programs per SM) default
    to what measured best on H100. `num_stages` pipelines the row-tile loop: 3 stages with one program
    per SM measured 5% faster in bf16 at 4K columns, but its shared memory grows with dtype and tile
    (fp32 at 4K columns would not fit), so it stays off until a guard is written (RESULTS.md)."""
    rows, grad_rows = as_rows(x), as_rows(grad_out)
    n_rows, n_cols = rows.shape
    tiling = tiling or backward_tiling(known(n_rows), known(n_cols))
    row_fits = tiling.fits(n_cols)
    slots = programs_per_slot * program_slots(x.device)
    n_programs = bounded(cdiv(n_rows, tiling.block_m), 1, slots)
    # traced with a symbolic row count, a buffer of n_programs rows (possibly 1) would guard on their number:
    # it takes `slots` rows then, of which the first n_programs are written and summed
    partial_rows = n_programs if known(n_programs) is not None else slots
    dx = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if weight is None:
        dw_partial = dw = torch.empty(0, dtype=torch.float32, device=x.device)
    else:  # the looping kernel adds into its row of the buffer, so that one starts at zero
        dw_partial = (torch.empty if row_fits else torch.zeros)((partial_rows, n_cols), dtype=torch.float32,
                                                               device=x.device)
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    launch(_rms_norm_backward_kernel, (n_programs,), ("rms_norm.backward", n_rows, n_cols),
        grad_rows, rows, weight, dx, dw_partial, n_rows, n_cols, grad_rows.stride(0), rows.stride(0), dx.stride(0),
        eps, weight_offset, HAS_WEIGHT=weight is not None, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
        ROW_FITS=row_fits, NUM_STAGES=num_stages, num_warps=tiling.num_warps)
    if weight is not None:
        launch(_sum_partials_kernel, (cdiv(n_cols, 128),), ("rms_norm.sum_partials", n_cols),
               dw_partial, dw, n_programs, n_cols, BLOCK_P=32, BLOCK_N=128, num_warps=4)
    return dx.view(x.shape), dw


# ---------------------------------------------------------------------------------------------
# Plain-torch references (CPU without the interpreter, float64 inputs, and the tests' oracle)
# ---------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float,
                       weight_before_cast: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The transformers formulas the op stands for, written the way they are written there."""
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(out_dtype)
    if weight_before_cast:
        return (y * (weight_offset + weight.to(xf.dtype))).to(out_dtype)
    return ((weight_offset + weight) * y.to(x.dtype)).to(out_dtype)


def rms_norm_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                                weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel's formulas in plain torch (float32, or float64 for float64 inputs)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, dy = x.to(compute), grad_out.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    g = dy if weight is None else dy * (weight_offset + weight.to(compute))
    dx = rstd * (g - xf * rstd.pow(2) * (g * xf).mean(-1, keepdim=True))
    if weight is None:
        return dx.to(x.dtype), x.new_empty(0, dtype=torch.float32)
    dw = (dy * xf * rstd).flatten(0, -2).sum(0) if x.dim() > 1 else dy * xf * rstd
    return dx.to(x.dtype), dw.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# The ops (kernels/runtime/ops.py): fuser::rms_norm over fuser::rms_norm_forward, fuser::rms_norm_backward
# ---------------------------------------------------------------------------------------------

def _backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                     weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is empty when there is no weight."""
    return rms_norm_backward_launch(grad_out, x, weight, eps, weight_offset)


def _backward_reference(grad_out, x, weight, eps, weight_offset):
    dx, dw = rms_norm_backward_reference(grad_out, x, weight, eps, weight_offset)
    return dx.contiguous(), dw


def _backward_fake(grad_out, x, weight, eps, weight_offset):
    dw = x.new_empty(0, dtype=torch.float32) if weight is None else weight.new_empty(weight.shape)
    return x.new_empty(x.shape), dw


_call_backward = fused_op("rms_norm_backward", _backward_kernel, _backward_reference, _backward_fake,
                          lambda grad_out, x, weight, *_: kernels_apply(grad_out, x, weight),
                          rows=Rows(args=(0, 1), summed=(1,)), symbolic=any_sizes)  # dweight sums over rows


def _forward_kernel(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float,
                    weight_before_cast: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return rms_norm_forward_launch(x, weight, eps, weight_offset, weight_before_cast, out_dtype)


def _forward_reference(x, weight, eps, weight_offset, weight_before_cast, out_dtype):
    return rms_norm_reference(x, weight, eps, weight_offset, weight_before_cast, out_dtype).contiguous()


def _forward_fake(x, weight, eps, weight_offset, weight_before_cast, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, eps, weight_offset, _, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.weight_offset = eps, weight_offset


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    dx, dw = _call_backward(grad_out, x, weight, ctx.eps, ctx.weight_offset)
    return dx, (dw if weight is not None else None), None, None, None, None


_call_forward = fused_op("rms_norm_forward", _forward_kernel, _forward_reference, _forward_fake,
                         lambda x, weight, eps, offset, before_cast, out_dtype: kernels_apply(x, weight,
                                                                                             out_dtype=out_dtype),
                         setup_context=_setup_context, backward=_backward, rows=Rows(args=(0,)), symbolic=any_sizes)


@entry_op
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float,
             weight_before_cast: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim; see the module docstring for the two weight forms."""
    return _call_forward(x, weight, eps, weight_offset, weight_before_cast, out_dtype)
