"""What every kernel module shares: when to launch Triton, dtype plumbing, row-wise tiling helpers."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

TORCH_TO_TRITON_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Launch the Triton kernel on CUDA tensors, or on CPU tensors under the interpreter.

    Anything else (a laptop CPU without the interpreter) runs the plain-torch reference,
    so the backend still works everywhere.
    """
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreting()


@dataclass(frozen=True)
class RowTiling:
    """How a row kernel covers a [rows, N] matrix: `block_m` rows × `block_n` columns at a time.

    A row longer than `block_n` is walked block by block; `block_m` > 1 gives short rows
    enough work per program.
    """
    block_m: int
    block_n: int
    num_warps: int

    @staticmethod
    def for_rows(n_rows: int, n_cols: int, max_block_n: int, min_tile: int = 2048, elements_per_thread: int = 16,
                 max_warps: int = 16) -> "RowTiling":
        """A tile of about `min_tile` or more elements, `elements_per_thread` of them per thread."""
        block_n = min(triton.next_power_of_2(max(n_cols, 1)), max_block_n)
        block_m = min(triton.next_power_of_2(max(n_rows, 1)), max(1, min_tile // block_n))
        num_warps = min(max_warps, max(1, block_m * block_n // (32 * elements_per_thread)))
        return RowTiling(block_m, block_n, num_warps)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a [rows, N] matrix whose last dim is contiguous (a view when strides allow)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def kernels_apply(*tensors: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> bool:
    """Triton where the device allows and every dtype is one the kernels compute (not float64)."""
    dtypes = [t.dtype for t in tensors if t is not None] + ([out_dtype] if out_dtype is not None else [])
    return use_triton(*tensors) and all(d in TORCH_TO_TRITON_SUPPORTED for d in dtypes)


@functools.lru_cache
def program_slots(device: torch.device) -> int:
    """How many programs a persistent kernel launches: the multiprocessor count (4 when interpreting)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


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
