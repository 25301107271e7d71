"""Triton device helpers every kernel family shares: row blocks, rounding stores, exp."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .runtime.dispatch import interpreting


@triton.jit
def program_rows(n_rows, BLOCK_M: tl.constexpr):
    """This program's rows as a [BLOCK_M, 1] int64 column (for row pointers) and which of them exist."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64)[:, None], rows < n_rows


@triton.jit
def load_rows(row_ptrs, row_ok, cols, n_cols, other, EVICTION: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] block as float32 (`other` outside the matrix)."""
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    return tl.load(row_ptrs + cols[None, :], mask=mask, other=other, eviction_policy=EVICTION).to(tl.float32)


@triton.jit
def store_rows(row_ptrs, row_ok, cols, n_cols, value):
    """Store a float32 block, rounded to the destination's dtype."""
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    tl.store(row_ptrs + cols[None, :], to_dtype(value, row_ptrs.dtype.element_ty), mask=mask)


# fp32 -> bf16 rounding that is the GPU's under the interpreter too: the interpreter converts by
# truncating the low 16 bits (and mangles subnormals), the GPU rounds to nearest even; on CPU, bf16
# results came out about 3x further from float64 than on the GPU, and biased, so tests measured the
# interpreter rather than the kernels. Under the interpreter the bf16 bits are computed here and
# reinterpreted; on the GPU `to_dtype` is a plain cast.
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """`x` as `dtype`, rounded to nearest even."""
    if _INTERPRETING and dtype == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = tl.where(x != x, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)  # NaN: the quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# exp on the GPU: tl.exp computes 2^(x·log2 e) with the product rounded to float32 (an error of |t|·2^-24
# in the exponent: 6e-6 relative at t = 100, 30x torch's expf) and an approximate 2^t that flushes
# subnormal results to 0. Float32 softmax gradients amplify the first where dy − Σdy·y cancels, and
# the second zeroes y = 1e-40 that torch keeps (the GPU fuzz found both: dx 2.1e-5 against the 1e-5
# contract on a row of 87; dx = 0, relative error 1, on a row of 2). libdevice's expf is torch's.
# The interpreter computes exp with numpy, exactly rounded.


@triton.jit
def exp(x):
    """exp of float32 `x` within an ulp or two, subnormal results included, like torch's expf."""
    if _INTERPRETING:
        return tl.exp(x)
    else:
        return libdevice.exp(x)
