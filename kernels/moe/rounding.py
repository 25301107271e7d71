"""fp32 -> bf16 rounding that is the GPU's under the Triton interpreter too.

The interpreter converts fp32 to bf16 by truncating the low 16 bits (and mangles subnormals), the
GPU rounds to nearest even: on CPU, bf16 results came out about 3x further from float64 than on
the GPU, and biased, so tests measured the interpreter rather than the kernel. Under the
interpreter the bf16 bits are computed here and reinterpreted; on the GPU this is a plain cast.
"""
import triton
import triton.language as tl

from .._common import interpreting

_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 `x` as `dtype`, rounded to nearest even."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = tl.where(x != x, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)  # NaN: the quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
