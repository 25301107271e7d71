"""`fuser::mla_decode` (absorbed multi-head latent attention over the latent cache) against float64.

The Triton kernels run through the interpreter (conftest.py) at small shapes: one program's rows across
heads and new tokens, contexts across blocks and splits (forced through `DecodeTiling`), the merge.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from torch._subclasses.fake_tensor import FakeTensorMode

from fuser.kernels.mla_decode import (DecodeTiling, decode_tiling, mla_decode_backward_reference, mla_decode_launch,
                                      mla_decode_reference)
from fuser.kernels.runtime import cdiv
from fuser.patterns.latent_attention import mla_decode_arguments
from numerics import assert_close, on_kernel_device

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make(batch=2, new_tokens=1, heads=4, latent=24, rope=8, context=37, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)
    return (randn(batch, new_tokens, heads, latent), randn(batch, new_tokens, heads, rope), randn(batch, context, latent),
            randn(batch, context, rope), (latent + rope) ** -0.5)


def float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def assert_matches_reference(args, tiling=None):
    q_lat, q_pe, c, k_pe, scale = args
    out = (torch.ops.fuser.mla_decode(*on_kernel_device(q_lat, q_pe, c, k_pe), scale) if tiling is None
           else mla_decode_launch(*on_kernel_device(q_lat, q_pe, c, k_pe), scale, tiling))
    ref = mla_decode_reference(*float64(args))
    assert out.dtype == q_lat.dtype and out.shape == q_lat.shape
    assert_close(out, ref, q_lat.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context, new_tokens", [(1, 1), (17, 1), (37, 3), (70, 5)])
def test_contexts_new_tokens_and_dtypes(context, new_tokens, dtype):
    """Context 1, contexts across 16-wide blocks, causal rows for several new tokens."""
    assert_matches_reference(make(context=context, new_tokens=new_tokens, dtype=dtype))


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
@pytest.mark.parametrize("new_tokens", [1, 4])
def test_context_splits_and_merge(splits, new_tokens):
    """Split-K with a last split shorter than the others; with 4 new tokens the last splits hold positions
    the first tokens cannot see (those rows' partials are empty)."""
    tiling = DecodeTiling(16, 16, 4, 1, splits)
    assert_matches_reference(make(context=75, new_tokens=new_tokens, dtype=torch.bfloat16), tiling)


def test_many_heads_span_programs():
    """19 heads × 2 tokens: 38 rows over three 16-row programs, a token's heads across two of them."""
    assert_matches_reference(make(heads=19, new_tokens=2, latent=40, rope=16, context=50))


def test_cache_views():
    """transformers' cache [B, 1, Lctx, R] viewed [:, 0]; a query transposed from [B, H, Lq, R]."""
    q_lat, q_pe, c, k_pe, scale = make(context=40, new_tokens=2)
    c_view = c.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()[:, 1]
    q_view = q_lat.transpose(1, 2).contiguous().transpose(1, 2)
    k_pe_view = torch.cat([k_pe, k_pe], -1)[..., : k_pe.shape[-1]]
    assert not q_view.is_contiguous() and not k_pe_view.is_contiguous()
    assert_matches_reference((q_view, q_pe, c_view, k_pe_view, scale))


@given(mla_decode_arguments())
def test_drawn_arguments(args):
    assert_matches_reference(args)


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_gradients_against_float64_autograd(new_tokens):
    """The backward (the reference formula written out) against autograd through the float64 reference."""
    args = make(context=21, new_tokens=new_tokens, heads=3)
    q_lat, q_pe, c, k_pe, scale = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    grad_out = torch.randn(q_lat.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(torch.ops.fuser.mla_decode(q_lat, q_pe, c, k_pe, scale), (q_lat, q_pe, c, k_pe),
                                grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q_lat, q_pe, c, k_pe)]
    expected = torch.autograd.grad(mla_decode_reference(*leaves, scale), leaves, grad_out.double())
    for grad, ref in zip(grads, expected):
        assert_close(grad, ref, torch.float32)
    written_out = mla_decode_backward_reference(grad_out.double(), *leaves, scale)
    for grad, ref in zip(written_out, expected):
        assert_close(grad, ref, torch.float64)


def test_arguments_that_do_not_fit():
    q_lat, q_pe, c, k_pe, scale = make(context=2, new_tokens=3)
    with pytest.raises(ValueError, match="must hold the 3 new tokens"):
        torch.ops.fuser.mla_decode(q_lat, q_pe, c, k_pe, scale)
    q_lat, q_pe, c, k_pe, scale = make()
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.fuser.mla_decode(q_lat, q_pe.half(), c, k_pe, scale)
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.fuser.mla_decode(q_lat, q_pe, c[..., :-1], k_pe, scale)


def test_fake_shapes():
    with FakeTensorMode():
        q_lat, q_pe, c, k_pe, scale = make(context=9, new_tokens=2, dtype=torch.bfloat16)
        out = torch.ops.fuser.mla_decode(q_lat, q_pe, c, k_pe, scale)
    assert out.shape == q_lat.shape and out.dtype == torch.bfloat16


def test_split_counts_fill_the_gpu():
    """V3's shapes on 132 multiprocessors: one batch element splits a long context until nearly every
    multiprocessor has a program (the H200's tiling: 64 splits of 2 row blocks), a large batch that fills them
    already splits at most once."""
    long_single = decode_tiling(1, 128, 65536, 512, 64, 2, 132)
    short_large = decode_tiling(32, 128, 4096, 512, 64, 2, 132)
    assert long_single.splits * cdiv(128, long_single.block_m) >= 0.95 * 132
    assert short_large.splits <= 2


def test_backward_op_check():
    """The backward op's schema, fake and AOT dispatch (the forward's: tests/test_ops.py)."""
    q_lat, q_pe, c, k_pe, scale = make(context=9, new_tokens=2)
    torch.library.opcheck(torch.ops.fuser.mla_decode_backward.default,
                          (torch.randn(q_lat.shape), q_lat, q_pe, c, k_pe, scale))
