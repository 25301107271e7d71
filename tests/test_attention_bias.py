"""A float mask that takes a gradient (a learned additive bias, T5's relative position bias) through
`fuser::attention`: the dQ kernel's dS, summed over the dims the bias broadcasts on, against float64 autograd of
the naive formula, with every other gradient; alone or with a padding mask added, causal, softcapped, dropped
out, with sinks, GQA, rows that see no key; then the pattern in training (a T5-style block, tiny T5); a bias with
a masked_fill / where mask in either order (FSMT's decoder), folded into one added mask where exact."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st

import fuser
from fuser.kernels.attention import AttentionLiterals, attention_reference
from fuser.kernels.attention.reference import reference_backward
from fuser.kernels.attention.tiles import OPEN, classify_tiles
from fuser.fuzzing import run_example
from fuser.models import tiny_t5
from fuser.patterns.attention import ATTENTION, attention
from fuser.patterns.attention_examples import two_term_examples
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


@pytest.mark.parametrize("causal", [False, True])
def test_a_bias_runs_its_fully_visible_tiles_together_across_cells(causal):
    """Lengths over several class cells (32 wide here): a bias's cells are OPEN (every value finite), so the tiles
    positions leave fully visible run as one loop adding it (tiles.open_run); values and every gradient, the
    bias's too, against float64."""
    lq, lk = 75, 90
    bias = torch.randn(1, HQ, lq, lk)
    classes = classify_tiles(bias, (0, *bias.stride()[1:]), (B, HQ), False, lq, lk, lk - lq, causal, 0)
    assert (classes[..., :-1, :-1] == OPEN.value).sum() >= 6, classes
    check_bias_gradient(torch.float32, (4, 2), lq, lk, "[1,H,L,S]", False, causal, 0.0, 0.0, False, "add", 3)


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


# A bias and a mask applied by masked_fill / where (FSMT: its causal mask added, then its padding filled): folded
# into the one added mask the kernel takes, where that is exact (patterns/attention.py: _bias_problem).
MIN32 = torch.finfo(torch.float32).min
ORDERS = ("bias, fill", "fill, bias", "where", "two added")


class TwoTermAttention(torch.nn.Module):
    """Scores of given q, k with a position bias ([1, H, L, L], learned or a buffer) and a mask ([B, 1, L, L],
    True = masked) in one of ORDERS: `(s + bias).masked_fill(pad, fill)`, `s.masked_fill(pad, fill) + bias`,
    `where(~pad, s + bias, fill)`, or two added terms `s + bias + padding_as_fill`; softmax in float32."""

    def __init__(self, order, fill, learned, heads=2, length=7):
        super().__init__()
        self.order, self.fill = order, fill
        bias = torch.randn(1, heads, length, length, generator=torch.Generator().manual_seed(5))
        if learned:
            self.bias = torch.nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)

    def forward(self, q, k, v, padded):
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if self.order == "bias, fill":
            scores = (scores + self.bias).masked_fill(padded, self.fill)
        elif self.order == "fill, bias":
            scores = scores.masked_fill(padded, self.fill) + self.bias
        elif self.order == "where":
            scores = torch.where(~padded, scores + self.bias, self.fill)
        else:
            scores = scores + self.bias + torch.zeros(padded.shape).masked_fill(padded, self.fill)
        return torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(scores), v)


def _two_term_inputs(qk_grad, seed=0):
    """q, k, v [2, 2, 7, 8] (v takes a gradient; q and k with `qk_grad`) and what is masked [2, 1, 7, 7]: later
    keys and padded ones, sequence 0 padding its last two keys, sequence 1 its first three (its first three rows
    see no key: FULL_ROWS)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=generator) for _ in range(3))
    padded = torch.zeros(2, 1, 1, 7, dtype=torch.bool)
    padded[0, ..., 5:], padded[1, ..., :3] = True, True
    masked = padded | torch.ones(7, 7, dtype=torch.bool).triu(1)
    return q.requires_grad_(qk_grad), k.requires_grad_(qk_grad), v.requires_grad_(), masked


FULL_ROWS = (1, slice(None), slice(0, 3))  # sequence 1's rows that see no key


def _run_two_term(block, qk_grad, grad=True):
    """(report, errors checked): compiled against float64 (output, and v's, q's, k's and the bias's gradients
    where they are taken)."""
    q, k, v, padded = _two_term_inputs(qk_grad)
    with torch.set_grad_enabled(grad):
        out, report = compile_and_run(block, q, k, v, padded, options={"strict": True})
    block64 = copy.deepcopy(block).double()
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    ref = block64(*leaves64, padded)
    assert_close(out, ref, torch.float32)
    if grad:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        ours = [t for t in (q, k, v, block.bias) if t.requires_grad]
        theirs = [t for t in (*leaves64, block64.bias) if t.requires_grad]
        for got, want in zip(torch.autograd.grad(out, ours, grad_out), torch.autograd.grad(ref, theirs,
                                                                                           grad_out.double())):
            assert_close(got, want, torch.float32)
    return report


@pytest.mark.parametrize("fill", [-math.inf, MIN32])
@pytest.mark.parametrize("order", ["bias, fill", "where", "two added"])
@pytest.mark.parametrize("learned", [False, True])
def test_a_bias_then_a_fill_is_folded_into_one_mask_where_q_and_k_take_no_gradient(order, fill, learned):
    """Eval (no grad) and training of the bias alone (q, k frozen): one attention, the bias and the padding read
    as one added tensor; output, v's and the bias's gradient against float64, with rows that see only padded
    keys (FULL_ROWS; finfo.min: V's average on both sides; -inf: NaN on both sides, their gradients too)."""
    block = TwoTermAttention(order, fill, learned)
    for grad in (False, True):
        report = _run_two_term(block, qk_grad=False, grad=grad)
        assert report.counts() == {"attention": 1}, report
        folded = "bias and mask folded into one tensor" if order != "two added" else "bias read as a tensor"
        assert folded in report.matches[0].mode, report
    if learned:
        assert block.bias.grad is None  # autograd.grad: nothing accumulated


def test_a_fill_then_a_bias_is_folded_with_a_minus_inf_fill():
    """`s.masked_fill(pad, -inf) + bias`: a masked score is -inf + bias = -inf, as score + (bias + -inf) is."""
    for learned in (False, True):
        report = _run_two_term(TwoTermAttention("fill, bias", -math.inf, learned), qk_grad=False)
        assert report.counts() == {"attention": 1}, report


def test_two_added_terms_are_rewritten_with_q_and_k_taking_their_gradient():
    """Two additive terms stay additive in the fold: nothing is replaced, every gradient passes as in the original."""
    report = _run_two_term(TwoTermAttention("two added", MIN32, learned=True), qk_grad=True)
    assert report.counts() == {"attention": 1}, report


@pytest.mark.parametrize(("order", "fill", "qk_grad", "reason"), [
    ("bias, fill", MIN32, True, "a bias and a mask applied by masked_fill while the scores take a gradient"),
    ("where", -math.inf, True, "a bias and a mask applied by where while the scores take a gradient"),
    ("fill, bias", MIN32, False, "a bias added after masked_fill with fill -3.40282e+38: a masked score becomes "
                                 "fill + bias"),
    ("fill, bias", -1e4, False, "a bias added after masked_fill with fill -10000: a masked score becomes fill + bias"),
    ("bias, fill", -1e9, False, "a bias added, then masked_fill sets masked scores to -1e+09"),
    ("where", 0.0, False, "a bias added, then where sets masked scores to 0"),
])
def test_two_terms_whose_fold_would_differ_are_near_misses(order, fill, qk_grad, reason):
    q, k, v, padded = _two_term_inputs(qk_grad)
    block = TwoTermAttention(order, fill, learned=True)
    out, report = compile_and_run(block, q, k, v, padded)
    assert "attention" not in report.counts(), report
    reasons = [n.reason for n in report.near_misses if n.pattern == "attention"]
    assert len(reasons) == 1 and reasons[0].startswith(reason), reasons
    assert report.counts() == {"softmax": 1}, report  # the original ran, its softmax fused alone
    torch.testing.assert_close(out, block(q, k, v, padded), equal_nan=True)


def _fold_through_the_kernel(q, k, v, folded):
    return AttentionLiterals(q.shape[-1] ** -0.5, masking="add").call(q, k, v, folded)


def test_what_the_refused_folds_would_give_differs_from_the_original():
    """The refusals are real: folded into one added mask (what the kernel takes), a row that sees only padded keys
    passes q a gradient masked_fill does not; a finite fill before a bias gives fill + bias, the fold score + it."""
    q, k, v, padded = _two_term_inputs(qk_grad=True)
    block = TwoTermAttention("bias, fill", MIN32, learned=False)
    (want,) = torch.autograd.grad(block(q, k, v, padded).sum(), [q])
    folded = torch.where(~padded, block.bias, MIN32)
    (got,) = torch.autograd.grad(_fold_through_the_kernel(*on_kernel_device(q, k, v, folded)).sum(), [q])
    assert want[FULL_ROWS].abs().max() == 0 and got.cpu()[FULL_ROWS].abs().max() > 1e-3
    got[FULL_ROWS] = 0.0
    torch.testing.assert_close(got.cpu(), want)  # elsewhere the same
    block = TwoTermAttention("fill, bias", -1e4, learned=False)  # older HF code fills with -10000
    with torch.no_grad():
        original = block(q, k, v, padded)
        refused = _fold_through_the_kernel(*on_kernel_device(q, k, v, torch.where(~padded, block.bias,
                                                                                  block.bias - 1e4))).cpu()
    assert (original - refused)[FULL_ROWS].abs().max() > 1e-3
    refused[FULL_ROWS] = original[FULL_ROWS]
    torch.testing.assert_close(refused, original)


@given(example=two_term_examples(attention))
def test_two_term_examples_are_rewritten_exactly(example):
    run_example(ATTENTION, example)
