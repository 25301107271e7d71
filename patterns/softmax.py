"""A softmax over the last dim (outside an attention), with or without an fp32 upcast → `fuser::softmax`."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuser.kernels.softmax import LIMITS
from fuser.patterns.base import Example, Pattern, Search, cast, dtype_name
from fuser.patterns.nodes import tensor_meta
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


def softmax(x, compute_dtype, dim, out_dtype):
    """`F.softmax(x, -1)`, `x.float().softmax(-1).to(x.dtype)`, `F.softmax(x, dim=-1, dtype=torch.float32)`."""
    return cast(torch.softmax(cast(x, compute_dtype), dim), out_dtype)


def check(m) -> str | None:
    x, dim = m.meta("x"), m.meta("dim")
    if not isinstance(x, torch.Tensor) or x.dtype not in LIMITS.dtypes:
        return f"input is not a float16/bfloat16/float32 tensor ({getattr(x, 'dtype', x)})"
    if dim not in (-1, x.dim() - 1):
        return f"softmax over dim {dim}, not the last dim"
    if m.get("compute_dtype") not in (None, torch.float32):
        return f"computes in {dtype_name(m.get('compute_dtype'))}; the kernel computes in float32"
    return None


def replace(m):
    return torch.ops.fuser.softmax(m["x"], tensor_meta(m.output).dtype)


def describe(m) -> str:
    return f"{dtype_name(m.meta('x').dtype)} → {dtype_name(tensor_meta(m.output).dtype)}, fp32 inside"


@st.composite
def _examples(draw) -> Example:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = tuple(draw(sizes(6)) for _ in range(draw(st.integers(0, 2)))) + (draw(sizes(300)),)
    x = draw(tensors(shape, dtype, scale=draw(st.sampled_from([1.0, 30.0]))))
    upcast = draw(st.booleans())
    return Example(softmax, {"x": x, "compute_dtype": torch.float32 if upcast else None, "dim": -1,
                             "out_dtype": dtype if upcast else None})


SOFTMAX = Pattern("softmax", (Search(softmax, _examples),), check, replace, describe, anchors=(torch.softmax,))
