"""A float mask that takes a gradient (a learned additive bias, T5's relative position bias) through
`fuser::attention`: the dQ kernel's dS, summed over the dims the bias broadcasts on, against float64 autograd of
the naive formula, with every other gradient; alone or with a padding mask added, causal, softcapped, dropped
out, with sinks, GQA, rows that see no key; then the pattern in training (a T5-style block, tiny T5)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st

import fuser
from fuser.kernels.attention import AttentionLiterals, attention_reference
from fuser.kernels.attention.reference import reference_backward
from fuser.models import tiny_t5
from helpers import compile_and_run, float64_reference
from numerics import assert_close, on_kernel_device

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's log2(0) on padding rows

B, HQ, D = 2, 4, 16
SHAPES = {"[1,H,L,S]": lambda lq, lk: (1, HQ, lq, lk), "[B,1,L,S]": lambda lq, lk: (B, 1, lq, lk),
          "[1,1,L,S]": lambda lq, lk: (1, 1, lq, lk), "[B,H,L,S]": lambda lq, lk: (B, HQ, lq, lk),
          "[L,S]": lambda lq, lk: (lq, lk)}


def _padding(lk: int, dtype, generator) -> torch.Tensor:
    """HF's additive key padding [B, 1, 1, Lk]: finfo.min on padded keys; sequence 0 pads every key (its rows
    see none: a softmax over score + fill)."""
    padded = torch.rand(B, 1, 1, lk, generator=generator) < 0.3
    padded[0] = True
    return torch.zeros(B, 1, 1, lk).masked_fill(padded, torch.finfo(dtype).min).to(dtype)


def _attend(q, k, v, bias, padding, literals, seed, sinks, forward):
    mask = bias if padding is None else bias + padding
    return forward(q, k, v, mask, literals, seed, sinks)


def _kernel(q, k, v, mask, literals, seed, sinks):
    return torch.ops.fuser.attention_forward(q, k, v, mask, *literals, seed, sinks)[0]


def _formula(q, k, v, mask, literals, seed, sinks):
    return attention_reference(q, k, v, mask, *literals, seed=seed, sinks=sinks)


def check_bias_gradient(dtype, heads, lq, lk, shape, padded, causal, softcap, dropout_p, has_sinks, masking, seed):
    """Values and the gradients of q, k, v, the bias (and sinks) meet the numerics contract against float64."""
    _, hkv = heads
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=generator).to(dtype) for h, n in ((HQ, lq), (hkv, lk), (hkv, lk)))
    bias = torch.randn(SHAPES[shape](lq, lk), generator=generator).to(dtype)
    padding = _padding(lk, dtype, generator) if padded else None
    sinks = torch.randn(HQ, generator=generator) if has_sinks else None
    literals = AttentionLiterals(D ** -0.5, causal, bottom_right=True, softcap=softcap, dropout_p=dropout_p,
                                 mask_value=-math.inf, masking=masking)
    drop_seed = torch.tensor(seed) if dropout_p else None
    leaves = [t.detach().requires_grad_() for t in on_kernel_device(q, k, v, bias, sinks) if t is not None]
    out = _attend(*leaves[:4], on_kernel_device(padding)[0], literals, on_kernel_device(drop_seed)[0],
                  leaves[4] if has_sinks else None, _kernel)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias, sinks) if t is not None]
    ref = _attend(*leaves64[:4], None if padding is None else padding.double(), literals, drop_seed,
                  leaves64[4] if has_sinks else None, _formula)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double().cpu())
    assert_close(out, ref, dtype)
    for name, grad, ref_grad in zip(("q", "k", "v", "bias", "sinks"), grads, ref_grads):
        assert grad.shape == ref_grad.shape, name
        assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", ["[1,H,L,S]", "[B,1,L,S]", "[1,1,L,S]"])
def test_a_broadcast_bias_gets_its_gradient_summed_over_the_broadcast_dims(shape, padded):
    check_bias_gradient(torch.float32, (4, 2), 19, 37, shape, padded, False, 0.0, 0.0, False, "add", 0)


@pytest.mark.parametrize("masking", ["add", "fill", "sdpa"])
def test_the_bias_gradient_through_dropout_sinks_softcap_and_causal_masking(masking):
    """dS of the dropped-out probabilities, with sinks in the softmax, through the softcap's tanh (the bias is
    added after it), causal positions passing no gradient but with "add"."""
    check_bias_gradient(torch.float32, (4, 2), 21, 26, "[1,H,L,S]", True, True, 5.0, 0.25, True, masking, 1)


@given(st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from([(4, 2), (4, 4), (4, 1)]),
       st.sampled_from([1, 9, 21]), st.integers(0, 17), st.sampled_from(sorted(SHAPES)), st.booleans(),
       st.booleans(), st.sampled_from([0.0, 5.0]), st.sampled_from([0.0, 0.25]), st.booleans(),
       st.sampled_from(["add", "fill", "sdpa"]), st.integers(0, 2**16))
def test_bias_gradient_matches_float64(dtype, heads, lq, extra_keys, shape, padded, causal, softcap, dropout_p,
                                       has_sinks, masking, seed):
    check_bias_gradient(dtype, heads, lq, lq + extra_keys, shape, padded, causal, softcap, dropout_p, has_sinks,
                        masking, seed)


def test_the_reference_backward_gives_autograd_s_bias_gradient():
    """The CPU path's explicit backward: the bias's gradient is float64 autograd's, softcapped and causal."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, HQ, 7, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, HQ, 7, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    literals = AttentionLiterals(0.4, causal=True, softcap=4.0, masking="fill")
    grad_out = torch.randn(B, HQ, 7, 8, generator=generator, dtype=torch.float64)
    (want,) = torch.autograd.grad(attention_reference(q, k, v, bias, *literals), [bias], grad_out)
    got = reference_backward(grad_out, q, k, v, bias.detach(), literals, mask_grad=True)[4]
    assert got.shape == bias.shape
    assert_close(got, want, torch.float64, 1e-12)
    assert reference_backward(grad_out, q, k, v, bias.detach(), literals)[4] is None


def test_a_constant_float_mask_and_a_bool_mask_get_no_gradient():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    for mask in (torch.zeros(1, 2, 5, 5), torch.ones(1, 1, 5, 5, dtype=torch.bool)):
        out = AttentionLiterals(0.3, masking="add").call(*on_kernel_device(q, q.detach(), q.detach(), mask))
        (grad,) = torch.autograd.grad(out.sum(), [q])
        assert grad.shape == q.shape and mask.grad is None


class T5StyleBlock(torch.nn.Module):
    """T5's attention in miniature: a relative-position bias from an embedding ([1, H, L, L], learned), plus HF's
    additive padding mask, added to unscaled scores; softmax in float32."""

    def __init__(self, dim=32, heads=4, length=10):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(dim, 3 * dim)
        self.relative_bias = torch.nn.Embedding(2 * length, heads)
        self.register_buffer("relative", torch.arange(length)[None, :] - torch.arange(length)[:, None] + length)

    def forward(self, x, padding):
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        position_bias = self.relative_bias(self.relative[:length, :length]).permute(2, 0, 1)[None]
        scores = torch.matmul(q, k.transpose(3, 2)) + (position_bias + padding)
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(weights, v).transpose(1, 2).reshape(b, length, dim)


@pytest.mark.parametrize("padded", [False, True])
def test_a_t5_style_block_is_rewritten_in_training_with_the_bias_gradient(padded):
    torch.manual_seed(0)
    block, x = T5StyleBlock(), torch.randn(2, 10, 32)
    padding = torch.zeros(2, 1, 1, 10)
    if padded:
        padding[0, ..., 7:] = torch.finfo(torch.float32).min
    out, report = compile_and_run(block, x, padding, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    assert "mask read as a tensor" in report.matches[0].mode, report
    out.square().sum().backward()
    block64 = copy.deepcopy(block).double()
    block64(x.double(), padding.double()).square().sum().backward()
    assert_close(out, block64(x.double(), padding.double()), torch.float32)
    for (name, p), p64 in zip(block.named_parameters(), block64.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, p64.grad, torch.float32)


def test_tiny_t5_in_training_has_every_attention_rewritten_with_float64_gradients():
    """Encoder self-, decoder self- and cross-attention of both layers (6 sites): the relative position bias
    (learned, in the first layer of encoder and decoder, passed on to the others) and the masks read as one
    tensor; loss and every parameter's gradient, the bias embeddings' included, against float64."""
    model = tiny_t5().train()
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 6:] = 0
    labels = ids[:, :7].contiguous()
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})
    loss = compiled(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    report = fuser.last_report()
    assert report.counts().get("attention") == 6, report
    loss.backward()
    reference = float64_reference(model)
    loss64 = reference(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    loss64.backward()
    assert_close(loss, loss64, torch.float32)
    biases = 0
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        if p64.grad is None:
            continue
        assert_close(p.grad, p64.grad, torch.float32), name
        biases += "relative_attention_bias" in name and p.grad.abs().sum().item() > 0
    assert biases == 2
