"""Latent attention (absorbed MLA decode): the hypothesis strategy of `fuser::mla_decode`'s arguments.

The kernel tests and `fuser.fuzz` draw from the same strategy; the graph pattern that finds the decode
expansion (kv_b_proj over the whole cache, then attention) under torch.compile joins it here.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuser.kernels.runtime import KERNEL_DTYPES
from .strategies import sizes, tensors


@st.composite
def mla_decode_arguments(draw, dtype: torch.dtype | None = None, max_context: int = 150, max_new_tokens: int = 5,
                         max_heads: int = 6, max_latent: int = 72, max_rope: int = 24):
    """(q_lat, q_pe, c, k_pe, scale): contexts from 1 to past several blocks and splits (rarely a multiple of
    any), 1 to a few new tokens (decode, speculative or chunked decode), head counts, latent and rotary
    widths that are no power of two, batch 1 or 2, every layout (the cache's transposed and sliced views
    included: transformers' cache is [B, 1, Lctx, R] viewed)."""
    dtype = dtype or draw(st.sampled_from(KERNEL_DTYPES))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, max_heads))
    new_tokens = draw(st.integers(1, max_new_tokens))
    context = draw(st.integers(new_tokens, max(new_tokens, max_context)))
    latent, rope = draw(sizes(max_latent)), draw(sizes(max_rope))
    q_lat = draw(tensors((batch, new_tokens, heads, latent), dtype))
    q_pe = draw(tensors((batch, new_tokens, heads, rope), dtype))
    c = draw(tensors((batch, context, latent), dtype))
    k_pe = draw(tensors((batch, context, rope), dtype))
    return q_lat, q_pe, c, k_pe, (latent + rope) ** -0.5
