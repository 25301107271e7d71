"""Hypothesis strategies of attention's spellings (patterns/attention.py registers them with its search rows):
4-D heads with every mask kind, batched heads over 3-D tensors (`torch.bmm`, the scores viewed per head for a
mask and back), tensor scales (a learned temperature, 0-d or per head), a bias with a masked_fill / where mask in
either order, SDPA after `repeat_kv`."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from fuser.patterns.base import Example
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors

UNSCALED = dict(q_scale=1.0, q_inverse=False, k_scale=1.0, k_inverse=False)


def _qkv(draw, n_rep_choices) -> tuple:
    """(dtype, q, k, v, n_rep): any batch, heads, lengths (1 and unequal ones included) and head dims."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    batch, kv_heads, n_rep = draw(sizes(2)), draw(st.integers(1, 2)), draw(st.sampled_from(n_rep_choices))
    lq = draw(st.one_of(st.just(1), st.integers(1, 40)))
    lk = draw(st.one_of(st.just(lq), st.integers(1, 40)))
    d = draw(st.sampled_from([8, 16, 24]))
    dv = draw(st.sampled_from([d, 8]))
    q = draw(tensors((batch, kv_heads * n_rep, lq, d), dtype))
    k = draw(tensors((batch, kv_heads, lk, d), dtype))
    v = draw(tensors((batch, kv_heads, lk, dv), dtype))
    return dtype, q, k, v, n_rep


@st.composite
def _four_d(draw, attention) -> Example:
    dtype, q, k, v, n_rep = _qkv(draw, [1, 2, 3, 4])
    batch, lq, lk, d = q.shape[0], q.shape[2], k.shape[2], q.shape[3]
    kv_heads = k.shape[1]
    mask_kind = draw(st.sampled_from(["none", "additive", "keep", "drop"]))
    mask, how, fill = None, "none", 0.0
    mask_shape = draw(st.sampled_from([(batch, 1, lq, lk), (1, 1, lq, lk), (lq, lk), (kv_heads * n_rep, lq, lk)]))
    if mask_kind == "additive":
        keep = draw(tensors(mask_shape, torch.float32, layout="contiguous")) > -0.5
        mask, how = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype), "add"
    elif mask_kind in ("keep", "drop"):
        keep = draw(tensors(mask_shape[1:] if len(mask_shape) == 4 else mask_shape, torch.float32,
                            layout="contiguous")) > -0.3
        keep[..., 0] = True  # at least one visible key per row: -inf rows are NaN on both sides
        mask, how, fill = (keep if mask_kind == "keep" else ~keep), mask_kind, float("-inf")
    upcast = draw(st.booleans())
    sinks = draw(tensors((1, kv_heads * n_rep, 1, 1), dtype)) if draw(st.booleans()) else None  # one per head
    bias = draw(tensors((1, kv_heads * n_rep, lq, lk), dtype)) if how in ("add", "none") and draw(st.booleans()) \
        else None  # a bias added before the mask (T5's position bias)
    return Example(attention, dict(
        q=q, k=k, v=v, mask=mask, n_rep=n_rep, **UNSCALED, scale=1.0 / math.sqrt(d), inverse=False,
        softcap=draw(st.sampled_from([0.0, 0.0, 20.0])), heads=0, bias=bias, fill=fill, how=how, late_bias=None,
        merged=False, sinks=sinks, dim=-1, compute_dtype=torch.float32 if upcast else None,
        sink_is_dropped=sinks is not None, out_dtype=dtype if upcast else None, dropout_p=0.0),
        constants=("mask", "bias"))


@st.composite
def two_term_examples(draw, attention) -> Example:
    """A bias and a mask applied by masked_fill / where (FSMT: its causal mask added, then the padding filled;
    or the padding filled with -inf, then a position bias added): folded into one added mask where q and k take
    no gradient (the bias may: learned or not). Fills the kernel hides: -inf, or finfo(dtype).min before a bias
    (rows the mask hides entirely then average V on both sides; float16's is not hidden)."""
    dtype, q, k, v, _ = _qkv(draw, [1])
    batch, heads, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    order = draw(st.sampled_from(["bias, fill", "fill, bias", "both"]))
    fill = float("-inf") if order != "bias, fill" or dtype == torch.float16 else draw(
        st.sampled_from([float("-inf"), torch.finfo(dtype).min]))
    shape = draw(st.sampled_from([(batch, 1, 1, lk), (batch, 1, lq, lk), (lq, lk)]))
    keep = draw(tensors(shape, torch.float32, layout="contiguous")) > -0.3
    if fill == float("-inf"):
        keep[..., 0] = True  # at least one visible key per row: -inf rows are NaN on both sides
    how = draw(st.sampled_from(["keep", "drop"]))
    bias_shape = draw(st.sampled_from([(1, heads, lq, lk), (lq, lk), (batch, 1, 1, lk)]))
    bias, late = (draw(tensors(bias_shape, dtype)) if order != which else None
                  for which in ("fill, bias", "bias, fill"))
    learned = draw(st.booleans())
    example = _plain(attention, q=q, k=k, v=v, scale=1.0 / math.sqrt(q.shape[-1]), how=how,
                     mask=keep if how == "keep" else ~keep, fill=fill, bias=bias, late_bias=late)
    return Example(attention, example.kwargs, ("q", "k", "mask") + (() if learned else ("bias", "late_bias")))


@st.composite
def sdpa_examples(draw, sdpa) -> Example:
    """SDPA calls the pattern rewrites without a mask builder to read: K/V repeated in front (`repeat_kv`),
    with no mask, a bool or float mask tensor, or is_causal."""
    dtype, q, k, v, n_rep = _qkv(draw, [2, 3, 4])
    lq, lk = q.shape[2], k.shape[2]
    mask_kind = draw(st.sampled_from(["none", "causal", "keep", "additive"]))
    mask = None
    if mask_kind == "keep":
        mask = draw(tensors((lq, lk), torch.float32, layout="contiguous")) > -0.3
        mask[..., 0] = True  # at least one visible key per row
    elif mask_kind == "additive":
        mask = draw(tensors((1, 1, lq, lk), dtype, layout="contiguous"))
    return Example(sdpa, dict(q=q, k=k, v=v, n_rep=n_rep, mask=mask, dropout_p=0.0, is_causal=mask_kind == "causal",
                              scale=draw(st.sampled_from([None, 0.3])), enable_gqa=False), constants=("mask",))




def _plain(attention, **kwargs) -> Example:
    """An example of the naive search with no repeat, softcap, cast or dropout: only `kwargs` given."""
    plain = dict(n_rep=1, **UNSCALED, softcap=0.0, heads=0, bias=None, mask=None, fill=0.0, how="none",
                 late_bias=None, merged=False, sinks=None, dim=-1, compute_dtype=None, sink_is_dropped=False,
                 out_dtype=None, dropout_p=0.0, inverse=False)
    return Example(attention, {**plain, **kwargs}, constants=("mask",))


@st.composite
def batched_head_examples(draw, attention) -> Example:
    """`torch.bmm(softmax(torch.bmm(q, k.transpose(1, 2)) * s), v)` on [B·H, L, D]: no mask, a mask of the 3-D
    scores, or the scores viewed as [B, H, Lq, Lk] to add a [B, 1, Lq, Lk] mask and viewed back."""
    dtype, batch, heads = draw(st.sampled_from(FLOAT_DTYPES)), draw(sizes(2)), draw(st.integers(1, 3))
    lq, d = draw(st.integers(1, 24)), draw(st.sampled_from([8, 16]))
    lk = draw(st.one_of(st.just(lq), st.integers(1, 24)))
    q, k, v = (draw(tensors((batch * heads, n, d), dtype)) for n in (lq, lk, lk))
    form = draw(st.sampled_from(["no mask", "3-D mask", "per-head view"]))
    mask, split = None, 0
    if form != "no mask":
        shape = (batch * heads, lq, lk) if form == "3-D mask" else (batch, 1, lq, lk)
        keep = draw(tensors(shape, torch.float32, layout="contiguous")) > -0.5
        keep[..., 0] = True
        mask, split = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype), heads if form != "3-D mask" else 0
    return _plain(attention, q=q, k=k, v=v, scale=1.0 / math.sqrt(d), mask=mask, how="none" if mask is None else "add",
                  heads=split, merged=bool(split))


@st.composite
def tensor_scale_examples(draw, attention) -> Example:
    """A temperature tensor: the scores multiplied or divided by a tensor (0-d, or per head [H, 1, 1]), which the
    rewrite folds into q; learned (its gradient checked with q, k and v's, by the contract's one policy). One key
    included: there the original's dq is exactly zero (the softmax of one score) and the kernel's is float32
    rounding, below what the contract's gradient resolution bounds."""
    dtype, batch, heads = draw(st.sampled_from(FLOAT_DTYPES)), draw(sizes(2)), draw(st.integers(1, 3))
    lq, lk, d = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.sampled_from([8, 16]))
    q, k, v = (draw(tensors((batch, heads, n, d), dtype)) for n in (lq, lk, lk))
    shape = draw(st.sampled_from([(), (heads, 1, 1), (1, heads, 1, 1)]))
    temperature = (draw(tensors(shape, torch.float32, layout="contiguous")).abs() + 0.5).to(
        dtype if shape else draw(st.sampled_from([dtype, torch.float32])))
    example = _plain(attention, q=q, k=k, v=v, scale=temperature, inverse=draw(st.booleans()))
    return Example(example.search, example.kwargs, ("mask",))


def naive_examples(attention):
    """Every naive spelling, each drawn as often as the others."""
    return st.one_of(_four_d(attention), batched_head_examples(attention), tensor_scale_examples(attention),
                     two_term_examples(attention))
