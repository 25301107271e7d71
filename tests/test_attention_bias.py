"""A float mask that takes a gradient (a learned bias) through `fuser::attention`: the kernels' dS summed over
the axes the mask broadcasts on, against float64 autograd of the naive formula; with causal masking,
softcapping, rows that see no key, GQA and the decode shapes."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fuser.kernels.attention import AttentionLiterals, attention_reference
from numerics import assert_close, on_kernel_device

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's log2(0) on padding rows


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from([(1, 1), (4, 2)]), st.sampled_from([1, 9, 21]),
       st.integers(0, 17), st.sampled_from(["per head", "per batch", "full"]), st.booleans(),
       st.sampled_from([0.0, 5.0]), st.integers(0, 2**16))
def test_bias_gradient_matches_float64(dtype, heads, lq, extra_keys, broadcast, causal, softcap, seed):
    hq, hkv = heads
    b, lk, d = 2, lq + extra_keys, 16
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=generator).to(dtype) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    shape = {"per head": (1, hq, lq, lk), "per batch": (b, 1, lq, lk), "full": (b, hq, lq, lk)}[broadcast]
    bias = torch.randn(shape, generator=generator).to(dtype)
    bias[..., 0, :] = torch.finfo(dtype).min  # a row that sees no key (a finite fill: softmax over score + fill)
    literals = AttentionLiterals(d ** -0.5, causal, bottom_right=True, softcap=softcap, mask_value=-math.inf,
                                 masking="add")
    leaves = [t.detach().requires_grad_() for t in on_kernel_device(q, k, v, bias)]
    out = literals.call(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = attention_reference(*leaves64, *literals)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double().cpu())
    assert_close(out, ref, dtype)
    for name, grad, ref_grad in zip(("q", "k", "v", "bias"), grads, ref_grads):
        assert grad.shape == ref_grad.shape, name
        assert_close(grad, ref_grad, dtype)


def test_a_bool_mask_and_a_constant_float_mask_get_no_gradient():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    constant = torch.zeros(1, 2, 5, 5)
    out = AttentionLiterals(0.3, masking="add").call(*on_kernel_device(q, q.detach(), q.detach(), constant))
    (grad,) = torch.autograd.grad(out.sum(), [q])
    assert grad.shape == q.shape and constant.grad is None
