"""Hypothesis building blocks for pattern examples: odd shapes, every dtype, strided views.

Tensors are made from a drawn seed (not drawn element by element), so examples stay cheap
to generate and to shrink; the shape, dtype and layout are what hypothesis explores.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuser.kernels.runtime import KERNEL_DTYPES as FLOAT_DTYPES  # noqa: F401  (examples draw the dtypes the kernels take)


def sizes(max_size: int) -> st.SearchStrategy[int]:
    """Sizes that are rarely multiples of any block: 1, small primes, odd numbers."""
    return st.one_of(st.just(1), st.integers(1, max_size))


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype, layout: str | None = None,
            scale: float = 1.0) -> torch.Tensor:
    """A tensor of `shape` and `dtype` whose memory layout is contiguous, transposed or sliced."""
    layout = layout or draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator) * scale
        return base.to(dtype).transpose(-1, -2)
    if layout == "sliced":
        base = torch.randn(*shape[:-1], shape[-1] + 3, generator=generator) * scale
        return base.to(dtype)[..., 1:-2]
    return (torch.randn(tuple(shape), generator=generator) * scale).to(dtype)
