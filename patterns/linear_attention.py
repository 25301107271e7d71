"""Linear attention (the gated delta rule): the hypothesis strategy of `fuser::gated_delta_rule`'s arguments.

The tests and `fuser.fuzz` draw from the same strategy; the graph pattern that finds the recurrence in
traced code (issue 15, ways 2 and 3) joins it here.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuser.kernels.runtime import KERNEL_DTYPES
from .strategies import sizes, tensors

# log decays per token: none at all, near 1 (exp(g) ≈ 0.999), mixed, near 0 (exp(g) ≈ 1e-9)
DECAYS = {"none": (0.0, 0.0), "near one": (-1e-3, 0.0), "mixed": (-3.0, 0.0), "near zero": (-25.0, -15.0)}


@st.composite
def gated_delta_arguments(draw, dtype: torch.dtype | None = None, max_length: int = 150, max_head_dim: int = 40):
    """(q, k, v, g, beta, initial_state, scale, l2norm): lengths below, at and past the chunk and the decode
    threshold, T = 1, value heads a multiple of key heads, head dims that are no power of two, every layout,
    β in [0, 1] (0 and 1 included), decays near 0 and near 1, normalized keys (l2norm) or unnormalized keys of
    about unit norm (the delta rule diverges for β‖k‖² > 2: no model feeds it such keys), an initial state or
    none. g stays float32, as transformers computes it."""
    dtype = dtype or draw(st.sampled_from(KERNEL_DTYPES))
    batch, length = draw(st.integers(1, 2)), draw(sizes(max_length))
    heads_k, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    dk, dv = draw(sizes(max_head_dim)), draw(sizes(max_head_dim))
    l2norm = draw(st.booleans())
    key_scale = 1.0 if l2norm else dk ** -0.5
    q = draw(tensors((batch, length, heads_k, dk), dtype))
    k = draw(tensors((batch, length, heads_k, dk), dtype, scale=key_scale))
    v = draw(tensors((batch, length, heads_k * groups, dv), dtype))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    low, high = DECAYS[draw(st.sampled_from(sorted(DECAYS)))]
    g = low + (high - low) * torch.rand(batch, length, heads_k * groups, generator=generator)
    beta = torch.rand(batch, length, heads_k * groups, generator=generator)
    beta[..., 0] = draw(st.sampled_from([0.0, 1.0, 0.5]))
    initial_state = None
    if draw(st.booleans()):
        initial_state = torch.randn(batch, heads_k * groups, dk, dv, generator=generator)
    return q, k, v, g, beta.to(dtype), initial_state, dk ** -0.5, l2norm
