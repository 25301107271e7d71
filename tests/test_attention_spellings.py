"""Attention spellings beyond 4-D heads with a literal scale: batched heads over 3-D tensors (`torch.bmm`, the
scores viewed per head for a mask), scales that are tensors (constants read exactly, learned temperatures
folded into q), and symbolic scalars (`torch.compile(dynamic=True)`); near misses left alone."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import fuser
from fuser.fuzzing import run_example
from fuser.models import tiny_inputs, tiny_model
from fuser.numerics.contract import judge, neighbour_floors, nudged
from fuser.patterns.attention import ATTENTION, attention
from fuser.patterns.attention_examples import batched_head_examples, tensor_scale_examples
from helpers import compile_and_run, compiled_with_padding
from numerics import assert_close

B, H, L, D = 2, 3, 11, 16


def _batched(dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B * H, L, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _per_head_mask():
    mask = torch.zeros(B, 1, L, L)
    mask[0, ..., :3] = torch.finfo(torch.float32).min
    return mask


def _viewed_per_head(q, k, v, mask):
    """GroupViT / older BART: scores viewed as [B, H, L, L] to add the mask, back, and the view round trip."""
    scores = torch.bmm(q, k.transpose(1, 2))
    scores = scores.view(B, H, L, L) + mask
    probs = F.softmax(scores.view(B * H, L, L), dim=-1)
    probs = probs.view(B, H, L, L).view(B * H, L, L)
    return torch.bmm(F.dropout(probs, p=0.1, training=False), v)


BATCHED = {
    # name: (function of q, k, v, mask; the mask; what the report's mode must say)
    "bmm": (lambda q, k, v, m: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * D ** -0.5, -1), v),
            None, "no mask, batched heads,"),
    "@ with a 3-D additive mask": (lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + m, -1) @ v,
                                   torch.randn(B * H, L, L), "mask read as a tensor, batched heads,"),
    "matmul with a causal masked_fill": (lambda q, k, v, m: torch.matmul(torch.softmax(torch.matmul(
        q, k.transpose(1, 2)).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1), v), None,
        "causal, no mask read, batched"),
    "SDPA on 3-D with a causal mask tensor": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool).tril()), None, "causal, no mask read, batched heads"),
    "scores viewed per head for the mask": (_viewed_per_head, _per_head_mask(),
                                            "mask read as a tensor, batched heads viewed per head"),
}


@pytest.mark.parametrize("spelling", BATCHED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_heads_are_one_match(spelling, dtype):
    fn, mask, mode = BATCHED[spelling]
    q, k, v = _batched(dtype)
    mask = None if mask is None else mask.to(dtype)
    out, report = compile_and_run(fn, q, k, v, mask, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    assert mode in report.matches[0].mode, report
    assert_close(out, fn(q.double(), k.double(), v.double(), None if mask is None else mask.double()), dtype)


@pytest.mark.parametrize("spelling", ["bmm", "scores viewed per head for the mask"])
def test_gradients_through_batched_heads(spelling):
    fn, mask, _ = BATCHED[spelling]
    q, k, v = _batched(requires_grad=True)
    out, report = compile_and_run(fn, q, k, v, mask, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = fn(*leaves, None if mask is None else mask.double())
    assert_close(out, ref, torch.float32)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad.float()), torch.autograd.grad(ref, leaves, grad)):
        assert_close(got, want, torch.float32)


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3)]


CONSTANT_SCALES = {
    "div by torch.full([], 4.0)": lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)).div(
        torch.full([], 4.0, dtype=q.dtype, device=q.device)), -1) @ v,
    "/ torch.tensor(d).sqrt()": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / torch.tensor(D).sqrt(), -1) @ v,
    "/ math.sqrt(d)": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v,
    "k / a float16 constant": lambda q, k, v: torch.softmax(q @ (k / torch.tensor(3.3, dtype=torch.float16)).transpose(
        -1, -2), -1) @ v,
}


@pytest.mark.parametrize("spelling", CONSTANT_SCALES)
def test_constant_tensor_scales_are_read_into_the_kernel_scale(spelling):
    """A tensor whose value is proved constant (every factory argument modeled, its dtype's rounding included)
    becomes the op's scale: nothing is folded into q."""
    fn = CONSTANT_SCALES[spelling]
    q, k, v = _qkv()
    out, report = compile_and_run(fn, q, k, v, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    assert "folded" not in report.matches[0].mode and "symbolic" not in report.matches[0].mode, report
    assert_close(out, fn(q.double(), k.double(), v.double()), torch.float32)


class Temperature(nn.Module):
    """A learned temperature on the scores, 0-d or per head; multiplied or divided."""

    def __init__(self, shape, divide):
        super().__init__()
        self.t = nn.Parameter(torch.rand(shape, generator=torch.Generator().manual_seed(2)) + 0.5)
        self.divide = divide

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        scores = scores / self.t if self.divide else scores * self.t
        return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("shape", [(), (H, 1, 1)])
@pytest.mark.parametrize("divide", [False, True])
def test_a_temperature_without_gradient_is_folded_into_q(shape, divide):
    """In inference (or a temperature that takes no gradient) the tensor is folded into q; q, k and v still
    get their gradients."""
    model = Temperature(shape, divide).requires_grad_(False)
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, report = compile_and_run(model, q, k, v, options={"strict": True})
    assert report.counts() == {"attention": 1} and "scale tensor folded into q" in report.matches[0].mode, report
    reference = Temperature(shape, divide).double()
    reference.load_state_dict(model.state_dict())
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves)
    assert_close(out, ref, torch.float32)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad.float()), torch.autograd.grad(ref, leaves, grad)):
        assert_close(got, want, torch.float32)


def _gradients(model, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    model.zero_grad()
    out = model(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in leaves] + [model.t.grad.clone()]


@pytest.mark.parametrize("shape", [(), (H, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_learned_temperature_in_training_is_rewritten_and_its_gradient_meets_the_contract(dtype, shape):
    """Folded into q, its gradient is Σ dq·q over the kernel's dq, a cancelling sum as the original's is: q, k,
    v within the tolerance, the temperature within the contract's one policy — the tolerance, twice the original's
    own error, or how far an ulp's nudge of the inputs moves the exact value (patterns/attention_scales.py)."""
    model = Temperature(shape, False).to(dtype)
    inputs = _qkv(dtype)
    grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})
    out, got = _gradients(compiled, inputs, grad_out)
    report = fuser.last_report()
    assert report.counts() == {"attention": 1} and "scale tensor folded into q" in report.matches[0].mode, report
    reference = copy.deepcopy(model).double()
    ref, want = _gradients(reference, [t.double() for t in inputs], grad_out)
    _, own = _gradients(model, inputs, grad_out)
    assert_close(out, ref, dtype)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype), name

    def measure(seed):
        nudged_inputs = nudged({"q": inputs[0], "k": inputs[1], "v": inputs[2], "t": model.t.detach()}, (), seed)
        near = copy.deepcopy(model)
        near.t.data.copy_(nudged_inputs["t"])
        near64 = copy.deepcopy(near).double()
        qkv = [nudged_inputs[name] for name in "qkv"]
        return {"t": (_gradients(near64, [t.double() for t in qkv], grad_out)[1][3],
                      _gradients(near, qkv, grad_out)[1][3])}
    verdict = judge(got[3], want[3], own=own[3], attainable=lambda: neighbour_floors(measure, {"t": want[3]})["t"])
    assert verdict.problem is None, verdict


SCALE_NEAR_MISSES = {
    # name: (function of q, k, v, t; t; what the near miss must say, or None: no attention site seen)
    "a scale tensor per score": (lambda q, k, v, t: torch.softmax(q @ k.transpose(-1, -2) * t, -1) @ v,
                                 torch.rand(L, L) + 0.5, "is not 0-d or the same for every key"),
    "a temperature after softmax": (lambda q, k, v, t: (torch.softmax(q @ k.transpose(-1, -2), -1) * t) @ v,
                                    torch.tensor(0.7), None),
    "transpose on the wrong dims": (lambda q, k, v, t: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(0, 1)), -1), v),
                                    None, None),
}


@pytest.mark.parametrize("case", SCALE_NEAR_MISSES)
def test_scale_and_batched_near_misses_are_left_alone(case):
    fn, t, reason = SCALE_NEAR_MISSES[case]
    # [L, L, L] tensors, so that bmm(q, k.transpose(0, 1)) runs
    q, k, v = (torch.randn(L, L, L) for _ in range(3)) if case == "transpose on the wrong dims" else _qkv()
    out, report = compile_and_run(fn, q, k, v, t, options={"strict": True})
    assert "attention" not in report.counts(), report
    if reason is not None:
        assert any(n.pattern == "attention" and reason in n.reason for n in report.near_misses), report
    assert_close(out, fn(q.double(), k.double(), v.double(), None if t is None else t.double()), torch.float32)


@given(example=batched_head_examples(attention))
def test_batched_head_examples_are_rewritten_exactly(example):
    run_example(ATTENTION, example)


@given(example=tensor_scale_examples(attention))
def test_tensor_scale_examples_are_rewritten_exactly(example):
    run_example(ATTENTION, example)


# --- symbolic scalars: torch.compile(dynamic=True) -----------------------------------------------

class FloatAttributes(nn.Module):
    """Hand-written attention and RMSNorm whose scale, softcap and eps are float attributes (graph inputs under
    dynamic=True)."""

    def __init__(self, softcap=0.0):
        super().__init__()
        self.scaling, self.softcap, self.eps = D ** -0.5, softcap, 1e-5
        self.weight = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, q, k, v):
        xf = q.float()
        q = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(q.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_symbolic_scale_softcap_and_eps_are_given_to_the_ops_at_run_time(softcap):
    model = FloatAttributes(softcap)
    q, k, v = (t.requires_grad_() for t in _qkv())
    torch._dynamo.reset()
    fuser.reset_reports()
    out = torch.compile(model, backend="fuser", dynamic=True, options={"codegen": "eager", "strict": True})(q, k, v)
    report = fuser.last_report()
    assert report.counts() == {"rms_norm": 1, "attention": 1}, report
    modes = " ".join(m.mode for m in report.matches)
    assert "eps=symbolic" in modes and "scale symbolic" in modes and ("softcap symbolic" in modes) == bool(softcap)
    reference = FloatAttributes(softcap).double()
    reference.load_state_dict(model.state_dict())
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves)
    assert_close(out, ref, torch.float32)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v, model.weight)),
                         torch.autograd.grad(ref.sum(), (*leaves, reference.weight))):
        assert_close(got, want, torch.float32)


def test_symbolic_scalars_go_through_inductor():
    """A custom op's float argument takes a SymFloat through Dynamo, AOTAutograd and Inductor (torch 2.13)."""
    model = FloatAttributes()
    q, k, v = _qkv()
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        out = torch.compile(model, backend="fuser", dynamic=True, options={"strict": True})(q, k, v)
        ref = model.double()(q.double(), k.double(), v.double())
    assert fuser.last_report().counts() == {"rms_norm": 1, "attention": 1}, fuser.last_report()
    assert_close(out, ref, torch.float32)


def test_llama_under_dynamic_shapes_keeps_every_rewrite():
    model = tiny_model("llama")
    ids = tiny_inputs(model)
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser", dynamic=True, options={"codegen": "eager", "strict": True})(
            ids).logits
        original = model(ids).logits
    assert fuser.last_report().counts() == {"rms_norm": 5, "attention": 2}, fuser.last_report()
    assert_close(logits, original, torch.float32)


def test_a_symbolic_dropout_probability_is_a_near_miss_saying_so():
    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = 0.25

        def forward(self, q, k, v):
            return F.dropout(torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1), self.p, training=True) @ v

    q, k, v = _qkv()
    torch._dynamo.reset()
    fuser.reset_reports()
    torch.compile(Dropped(), backend="fuser", dynamic=True, options={"codegen": "eager"})(q, k, v)
    report = fuser.last_report()
    assert "attention" not in report.counts(), report
    assert any("dropout p is a symbolic scalar" in n.reason for n in report.near_misses), report


@pytest.mark.parametrize("padding", [False, True])
def test_every_layer_of_groupvit_text_batched_head_attention_is_rewritten(padding):
    """transformers' GroupViT text encoder writes attention as bmm over [B·H, L, D] with its causal and padding
    mask added to the scores viewed as [B, H, L, L]: every layer is one match, the mask run natively."""
    from transformers import GroupViTTextConfig, GroupViTTextModel

    config = GroupViTTextConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GroupViTTextModel(config).eval()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    out, original, reference, report = compiled_with_padding(model, ids, padding, 2, "last_hidden_state")
    assert report.counts().get("attention") == 2, report
    expected = "causal, key padding, batched heads viewed per head" if padding else "causal, no mask read, batched heads"
    assert all(expected in m.mode for m in report.matches if m.pattern == "attention"), report
    assert_close(out, original, torch.float32)
    assert_close(out, reference, torch.float32)
