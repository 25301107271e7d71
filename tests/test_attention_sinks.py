"""Attention sinks (`fuser::attention(..., sinks=σ)`): gpt-oss's naive code in float64 against the kernels
(interpreter on CPU) and the reference path, values and gradients to q, k, v and the sinks; fully masked
rows put their whole weight on the sink."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fuser.kernels.attention import AttentionLiterals
from fuser.kernels.attention.reference import reference_backward
from numerics import assert_close, on_kernel_device, tolerance

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's log2(0) on padding rows
FINFO_MIN = torch.finfo(torch.float32).min


def gpt_oss_attention(q, k, v, mask, scale, sinks):
    """transformers' gpt-oss `eager_attention_forward` (repeat_kv folded into the expand)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(2, 3) * scale
    if mask is not None:
        scores = scores + mask
    combined = torch.cat([scores, sinks.expand(*scores.shape[:3])[..., None]], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return probs.to(v.dtype) @ v


def causal_padding_mask(b, lq, lk, padded_rows: bool, generator):
    """HF's additive causal mask with left padding (finfo.min), queries at the end of the keys; padded_rows
    hides every key from the first rows of batch 0."""
    rows = torch.arange(lq)[:, None] + (lk - lq)
    keys = torch.arange(lk)[None, :]
    padded = torch.rand(b, 1, 1, lk, generator=generator) < 0.25
    if padded_rows:
        padded[0, ..., : lk - lq + 2] = True
    hidden = (keys > rows) | padded
    return torch.where(hidden, FINFO_MIN, 0.0)


def _inputs(b, hq, hkv, lq, lk, d, dtype, sinks_shape, padded_rows, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=generator).to(dtype) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    sinks = (torch.randn(*sinks_shape, generator=generator) * 2).to(dtype)
    mask = causal_padding_mask(b, lq, lk, padded_rows, generator).to(dtype)
    return q, k, v, mask, sinks


def _check(q, k, v, mask, sinks, scale):
    literals = AttentionLiterals(scale, mask_value=FINFO_MIN, masking="add")
    leaves = [t.detach().requires_grad_() for t in on_kernel_device(q, k, v, sinks)]
    out = literals.call(*leaves[:3], *on_kernel_device(mask), sinks=leaves[3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref = gpt_oss_attention(*leaves64[:3], mask.double(), scale, leaves64[3])
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double().cpu())
    assert_close(out, ref, q.dtype)
    for name, grad, ref_grad in zip(("q", "k", "v", "sinks"), grads, ref_grads):
        assert grad.shape == ref_grad.shape, name
        assert_close(grad, ref_grad, q.dtype, tolerance(q.dtype))
    return out


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16]), st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.sampled_from([1, 5, 23]), st.integers(0, 19), st.sampled_from([8, 16]),
       st.sampled_from(["head", "row"]), st.booleans(), st.integers(0, 2**16))
def test_sinks_match_gpt_oss_code(dtype, b, heads, lq, extra_keys, d, per, padded_rows, seed):
    hq, hkv = heads
    lk = lq + extra_keys
    sinks_shape = (hq, 1) if per == "head" else (b, hq, lq)
    q, k, v, mask, sinks = _inputs(b, hq, hkv, lq, lk, d, dtype, sinks_shape, padded_rows and lq > 2, seed)
    _check(q, k, v, mask, sinks, d ** -0.5)


def test_rows_that_see_no_key_put_their_weight_on_the_sink():
    """Fully masked rows give zeros (−inf fill: no NaN, as the naive code with a sink gives)."""
    q, k, v, _, sinks = _inputs(1, 2, 2, 6, 6, 8, torch.float32, (2, 1), False, 3)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    keep[:2] = False
    out = AttentionLiterals(0.3, masking="fill").call(*on_kernel_device(q, k, v, keep), sinks=on_kernel_device(sinks)[0])
    assert torch.equal(out[:, :, :2].cpu(), torch.zeros_like(out[:, :, :2].cpu()))
    assert out[:, :, 2:].isfinite().all()
    ref = gpt_oss_attention(q.double(), k.double(), v.double(), torch.where(keep, 0.0, -math.inf).double(), 0.3,
                            sinks.double())
    assert_close(out, ref, torch.float32)


def test_reference_backward_with_sinks_is_autograd_of_the_code():
    q, k, v, mask, sinks = _inputs(2, 4, 2, 7, 11, 8, torch.float64, (4, 1), True, 5)
    grad_out = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(gpt_oss_attention(*leaves, mask, 0.4, sinks), leaves, grad_out)
    literals = AttentionLiterals(0.4, mask_value=FINFO_MIN, masking="add")
    for grad, ref_grad in zip(reference_backward(grad_out, q, k, v, mask, literals, sinks=sinks), expected):
        assert_close(grad, ref_grad, torch.float64, 1e-12)


def test_sinks_are_refused_where_they_do_not_apply():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="sdpa"):
        AttentionLiterals(0.3, masking="sdpa").call(q, q, q, sinks=torch.zeros(2, 1))
    with pytest.raises(RuntimeError):
        AttentionLiterals(0.3).call(q, q, q, sinks=torch.zeros(3, 1))
