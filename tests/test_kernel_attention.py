"""`fuser::attention` against the float64 reference: values, gradients, fully masked rows in each
masking (the naive formula, an added mask, SDPA), the split and packed decode paths, dropout, fake
functions and torch.compile.

Runs the real Triton kernels through the interpreter on CPU (conftest.py) with 16×16 blocks and
32×32 tile-class cells, so small odd shapes cross every block, cell and split boundary.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from fuser.kernels.attention import AttentionLiterals, attention_reference, plan
from fuser.kernels.attention.tiles import HeadBlocks
from fuser.kernels.attention.reference import MASKINGS, reference_backward, reference_forward
from numerics import assert_close, on_kernel_device, tolerance

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's log2(0) on padding rows

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_KINDS = ("none", "key_padding", "bool_full", "bool_per_head", "float", "float_min_padding")


def make_qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout, seed):
    """q, k, v in [B, H, L, D] views: contiguous, transposed from [B, L, H, D], or sliced."""
    generator = torch.Generator().manual_seed(seed)

    def one(h, length, dim):
        if layout == "transposed":
            return torch.randn(b, length, h, dim, generator=generator).to(dtype).transpose(1, 2)
        if layout == "sliced":
            return torch.randn(b, h, length, dim + 3, generator=generator).to(dtype)[..., 1:-2]
        return torch.randn(b, h, length, dim, generator=generator).to(dtype)

    return one(hq, lq, d), one(hkv, lk, d), one(hkv, lk, dv)


def make_mask(kind, b, hq, lq, lk, dtype, seed):
    """The mask forms patterns pass: expanded key padding, full bool, per head, additive float."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "key_padding":  # [B, 1, 1, Lk] expanded, stride 0; the second sequence fully hidden
        keep = torch.rand(b, 1, 1, lk, generator=generator) > 0.3
        keep[0, ..., : max(1, lk // 2)] = False
        keep[1:] = False
        return keep.expand(b, hq, lq, lk)
    if kind == "bool_full":
        return torch.rand(1 if b == 1 else b, 1, lq, lk, generator=generator) > 0.4
    if kind == "bool_per_head":
        return torch.rand(b, hq, lq, lk, generator=generator) > 0.4
    if kind == "float":
        return (torch.randn(b, 1, lq, lk, generator=generator) * 2).to(dtype)
    fill = torch.finfo(dtype).min  # HF style: 0 where visible, finfo.min on padded keys
    padded = torch.rand(b, 1, 1, lk, generator=generator) < 0.4
    return torch.zeros(b, 1, lq, lk, dtype=dtype).masked_fill(padded, fill)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    lq = draw(st.one_of(st.just(1), st.integers(1, 40)))
    lk = draw(st.one_of(st.just(1), st.integers(1, 48)))
    d = draw(st.sampled_from([8, 20, 32]))
    dv = draw(st.sampled_from([d, 12]))
    b = draw(st.integers(1, 2))
    causal = draw(st.booleans())
    window = draw(st.sampled_from([0, 0, 1, 5, 17]))
    masking = draw(st.sampled_from(MASKINGS))
    if masking == "add":  # as the patterns pass it: no float mask besides, a fill that swallows the score
        # (finfo(float16).min does not: score + fill then rounds in float32, as in the float32 original)
        mask_kind = draw(st.sampled_from([kind for kind in MASK_KINDS if kind != "float_min_padding"]))
        mask_value = draw(st.sampled_from([-math.inf, torch.finfo(torch.float32).min]))
    else:
        mask_kind = draw(st.sampled_from(MASK_KINDS))
        mask_value = draw(st.sampled_from([-math.inf, torch.finfo(dtype).min, torch.finfo(torch.float32).min]))
    return dict(b=b, hq=hkv * group, hkv=hkv, lq=lq, lk=lk, d=d, dv=dv, dtype=dtype, causal=causal, window=window,
                bottom_right=draw(st.booleans()), softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
                mask_kind=mask_kind, mask_value=mask_value, masking=masking,
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2**20)))


def float64_reference(q, k, v, mask, literals, grad_out, formula=None):
    """The formula (or `formula` of float64 q, k, v) in float64 and its autograd gradients."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if formula is None:
        mask64 = None if mask is None or mask.dtype == torch.bool else mask.double()
        out = attention_reference(*leaves, mask if mask64 is None else mask64, *literals)
    else:
        out = formula(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out, grads


def check_case(q, k, v, mask, literals, tol=None, formula=None):
    """Values and gradients of the op meet the numerics contract against float64."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torch.ops.fuser.attention(*leaves, mask, *literals)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref, ref_grads = float64_reference(q, k, v, mask, literals, grad_out, formula)
    limit = tol or tolerance(q.dtype)
    assert_close(out, ref, q.dtype, limit)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.shape == ref_grad.shape, name
        assert_close(grad, ref_grad, q.dtype, limit)


@given(cases())
def test_matches_float64(case):
    q, k, v = make_qkv(case["b"], case["hq"], case["hkv"], case["lq"], case["lk"], case["d"], case["dv"],
                       case["dtype"], case["layout"], case["seed"])
    mask = make_mask(case["mask_kind"], case["b"], case["hq"], case["lq"], case["lk"], case["dtype"], case["seed"])
    scale = case["scale"] or case["d"] ** -0.5
    literals = (scale, case["causal"], case["window"], case["bottom_right"], case["softcap"], 0.0,
                case["mask_value"], case["masking"])
    check_case(q, k, v, mask, literals)


@given(cases())
def test_reference_backward_is_autograd_of_the_formula(case):
    """The CPU path's explicit backward equals float64 autograd of the naive formula, fully masked
    rows (NaN, masked_fill's zero gradient, SDPA's zeros) included, in every masking."""
    q, k, v = make_qkv(case["b"], case["hq"], case["hkv"], case["lq"], case["lk"], case["d"], case["dv"],
                       torch.float64, case["layout"], case["seed"])
    mask = make_mask(case["mask_kind"], case["b"], case["hq"], case["lq"], case["lk"], torch.float64, case["seed"])
    literals = (0.3, case["causal"], case["window"], case["bottom_right"], case["softcap"], 0.0, case["mask_value"],
                case["masking"])
    grad_out = torch.randn(*q.shape[:3], v.shape[3], dtype=torch.float64)
    _, expected = float64_reference(q, k, v, mask, literals, grad_out)
    for grad, ref_grad in zip(reference_backward(grad_out, q, k, v, mask, AttentionLiterals(*literals)), expected):
        assert_close(grad, ref_grad, torch.float64, 1e-12)


@pytest.mark.parametrize("mask_value", [-math.inf, torch.finfo(torch.float32).min, -1e4])
@pytest.mark.parametrize("form", ["bool_padding", "float_min", "queries_before_keys", "window_and_bool"])
def test_fully_masked_rows(form, mask_value):
    """Rows that see no key: NaN with a −inf fill, the average of V over all keys with a finite one
    (and the naive formula's gradients): skipping tiles must not change them."""
    b, hq, lq, lk, d = 2, 2, 37, 45, 16
    q, k, v = make_qkv(b, hq, 1, lq, lk, d, d, torch.float32, "contiguous", 3)
    causal, window, bottom_right, mask = False, 0, False, None
    if form == "bool_padding":
        keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        keep[1] = False
        keep[0, ..., 20:] = False
        mask = keep
    elif form == "float_min":  # an HF-style float mask with causal folded in, first batch fully padded
        mask = torch.zeros(b, 1, lq, lk).masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), torch.finfo(
            torch.float32).min)
        mask[0] = torch.finfo(torch.float32).min
    elif form == "queries_before_keys":  # Lq > Lk bottom-right: the first Lq − Lk queries see nothing
        causal, bottom_right = True, True
        q = q[:, :, :, :].repeat(1, 1, 2, 1)[:, :, :60]
    else:
        causal, window = True, 3
        mask = torch.rand(1, 1, lq, lk, generator=torch.Generator().manual_seed(2)) > 0.7
    check_case(q, k, v, mask, (d ** -0.5, causal, window, bottom_right, 0.0, 0.0, mask_value))


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -math.inf])
def test_an_added_fill_passes_gradient_on_fully_masked_rows(fill):
    """masking="add" is the additive mask where(keep, 0, fill) of HF eager code: a row that sees no
    key softmaxes score + fill over all keys (uniform once the fill swallows the score) and its
    gradient reaches q and k there, where masked_fill's gives none (with −inf: NaN, as the naive code)."""
    b, h, lq, lk, d = 2, 2, 37, 45, 16
    q, k, v = make_qkv(b, h, h, lq, lk, d, d, torch.float32, "contiguous", 4)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., :20] = False  # left padding: with causal, the first 20 queries see nothing
    scale = d ** -0.5

    def naive(q, k, v):
        visible = torch.ones(lq, lk, dtype=torch.bool).tril() & keep
        return torch.softmax(q @ k.transpose(-1, -2) * scale + torch.where(visible, 0.0, fill).double(), dim=-1) @ v

    check_case(q, k, v, keep, (scale, True, 0, False, 0.0, 0.0, fill, "add"), formula=naive)


@pytest.mark.parametrize("form", ["padding_and_causal", "queries_before_keys", "float_mask"])
def test_sdpa_masking_gives_sdpa_zeros(form):
    """masking="sdpa": rows whose scores are all −inf give zeros and no gradient, as
    F.scaled_dot_product_attention (its safe softmax); a finfo.min row still averages V. Against SDPA's
    math backend: its CPU flash backward multiplies a finfo.min row's gradient by Lk (its saved
    log-sum-exp loses the log(Lk) next to −3.4e38)."""
    b, hq, lq, lk, d = 2, 2, 37, 45, 16
    q, k, v = make_qkv(b, hq, 1, lq, lk, d, d, torch.float32, "contiguous", 3)
    causal, bottom_right, mask = False, False, None
    if form == "padding_and_causal":  # a fully padded sequence, and queries before the first kept key
        causal, mask = True, torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[0, ..., :20] = False
        mask[1] = False
        sdpa_mask = mask & torch.ones(lq, lk, dtype=torch.bool).tril()
    elif form == "queries_before_keys":  # bottom-right causal, Lq > Lk: the first Lq − Lk queries see nothing
        causal, bottom_right = True, True
        q = q.repeat(1, 1, 2, 1)[:, :, :60]
        sdpa_mask = torch.ones(60, lk, dtype=torch.bool).tril(lk - 60)
    else:
        mask = torch.randn(b, 1, lq, lk, generator=torch.Generator().manual_seed(2)) * 2
        mask[0, :, :5] = -math.inf
        mask[1, :, 3] = torch.finfo(torch.float32).min
        mask[1, :, 6:, :30] = -math.inf
        sdpa_mask = mask.double()

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, sdpa_mask, scale=0.3, enable_gqa=True)

    check_case(q, k, v, mask, (0.3, causal, 0, bottom_right, 0.0, 0.0, -math.inf, "sdpa"), formula=sdpa)

@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_visible_tiles_run_together_up_to_the_first_cell_that_may_hide_a_score(kind, causal):
    """A bool mask True but in one late cell, or a bias plus right padding (finfo.min on each sequence's last
    keys): the cells before are FULL or OPEN, so each row block's fully visible tiles up to there run without
    elementwise masks (adding the bias), the rest one by one; values and gradients against float64."""
    q, k, v = make_qkv(2, 4, 2, 70, 100, 16, 16, torch.float32, "contiguous", 5)
    if kind == "bool":
        mask = torch.ones(2, 1, 70, 100, dtype=torch.bool)
        mask[1, :, 40:, 70:75] = False
    else:
        padded = torch.arange(100) >= torch.tensor([[85], [50]])
        mask = torch.randn(1, 4, 70, 100) + torch.zeros(2, 1, 1, 100).masked_fill(padded[:, None, None],
                                                                                 torch.finfo(torch.float32).min)
    check_case(q, k, v, mask, AttentionLiterals(0.25, causal, bottom_right=True))


@pytest.mark.parametrize("pack_gqa", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "float"])
def test_split_keys_and_packed_heads(pack_gqa, mask_kind):
    """The decode paths (query heads packed into rows, keys split across programs, partial
    softmaxes merged) agree with the reference, fully masked rows included."""
    b, hq, hkv, lq, lk, d = 2, 4, 2, 3, 70, 24
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, 20, torch.float32, "transposed", 5)
    mask = make_mask(mask_kind, b, hq, lq, lk, torch.float32, 5)
    kernel_q, kernel_k, kernel_v, kernel_mask = on_kernel_device(q, k, v, mask)  # the plan is the kernels'
    for causal, window, fill, masking in [(True, 0, torch.finfo(torch.float32).min, "fill"),
                                          (True, 9, torch.finfo(torch.float32).min, "fill"),
                                          (False, 0, torch.finfo(torch.float32).min, "fill"),
                                          (True, 0, -math.inf, "sdpa")]:
        literals = AttentionLiterals(d ** -0.5, causal, window, True, 0.0, 0.0, fill, masking)
        launches = plan.build_plan(kernel_q, kernel_k, kernel_v, kernel_mask, literals)
        out, stats, _ = plan.forward(launches, kernel_q, kernel_k, kernel_v, kernel_mask, None, num_splits=3,
                                     pack_gqa=pack_gqa)
        out, stats = out.cpu(), stats.cpu()
        mask64 = None if mask is None or mask.dtype == torch.bool else mask.double()
        ref, lse = reference_forward(q.double(), k.double(), v.double(), mask if mask64 is None else mask64,
                                     literals)
        assert_close(out, ref, torch.float32)
        seen = lse > -1e30  # rows that see a key: a finfo.min row keeps the fill as clamped in log2 units
        assert_close((stats.sum(-1) * math.log(2))[seen], lse[seen], torch.float32)


def dropout_probabilities(q, k, p, seed):
    """The op's dropped, rescaled probabilities, read out through V = identity."""
    lk = k.shape[2]
    eye = torch.eye(lk).expand(k.shape[0], k.shape[1], lk, lk)
    torch.manual_seed(seed)
    return torch.ops.fuser.attention(q, k, eye, None, 0.5, False, 0, False, 0.0, p, -math.inf)


def test_dropout_keep_rate_and_expectation():
    b, h, lq, lk, p = 2, 2, 64, 32, 0.3
    q, k, _ = make_qkv(b, h, h, lq, lk, 16, 16, torch.float32, "contiguous", 7)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    dropped = dropout_probabilities(q, k, p, seed=11)
    kept = dropped != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02
    torch.testing.assert_close(dropped[kept], (probs / (1 - p))[kept], rtol=1e-5, atol=1e-7)
    # over n draws each dropped probability is probs · Binomial(n, 1 − p) / (n (1 − p)): its squared
    # z-score averages 1 (std of that average ≈ 0.015 here)
    other = dropout_probabilities(q, k, p, seed=12)
    assert not torch.equal(other != 0, kept)
    draws = 12
    mean = sum(dropout_probabilities(q, k, p, seed=s) for s in range(draws)) / draws
    z = (mean - probs) / (probs * math.sqrt(p / ((1 - p) * draws)))
    assert 0.9 < z.pow(2).mean().item() < 1.1
    # p = 0 is exact
    torch.testing.assert_close(dropout_probabilities(q, k, 0.0, seed=0),
                               probs.to(torch.float32), rtol=1e-5, atol=1e-6)


def test_dropout_backward_regenerates_the_mask():
    """Gradients with dropout match float64 autograd through the same keep-mask."""
    b, h, lq, lk, d, p = 1, 2, 21, 30, 16, 0.25
    q, k, v = make_qkv(b, h, h, lq, lk, d, d, torch.float32, "contiguous", 9)
    keep = dropout_probabilities(q, k, p, seed=5) != 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out = torch.ops.fuser.attention(*leaves, None, 0.5, False, 0, False, 0.0, p, -math.inf)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    probs = torch.softmax(ref_leaves[0] @ ref_leaves[1].transpose(-1, -2) * 0.5, dim=-1)
    ref = (probs * keep / (1 - p)) @ ref_leaves[2]
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert_close(out, ref, torch.float32)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad, torch.float32)


def test_dropout_is_the_references_philox_stream():
    """The kernels drop by Philox4x32-10 of (seed tensor; key, query, batch·head): the reference draws the same
    stream in torch (reference.philox_uniform), so dropout is checked against float64, gradients too."""
    q, k, v = make_qkv(2, 4, 2, 19, 23, 16, 16, torch.float32, "contiguous", 3)
    literals = AttentionLiterals(0.4, causal=True, window=9, dropout_p=0.3)
    seed = torch.tensor(2**31 - 5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.fuser.attention_forward(*leaves, None, *literals, seed, None)[0]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, leaves, grad_out)
    plain = [t.double() for t in (q, k, v)]
    assert_close(out, reference_forward(*plain, None, literals, seed)[0], torch.float32)
    for grad, expected in zip(grads, reference_backward(grad_out.double(), *plain, None, literals, seed)):
        assert_close(grad, expected, torch.float32)


@pytest.mark.parametrize("path", ["plain", "split", "packed"])
def test_sinks_values_and_gradients(path):
    """Sinks (GPT-OSS: a per-head logit in each row's softmax, with no value) against float64, their gradient too:
    GQA with a padding mask that hides every key from some rows (their output is 0: the sink takes the row), the
    split-keys and packed-heads decode paths."""
    q, k, v = make_qkv(1, 4, 2, 5 if path == "packed" else 20, 37, 16, 16, torch.float32, "contiguous", 5)
    mask = torch.rand(1, 1, q.shape[2], 37, generator=torch.Generator().manual_seed(6)) > 0.5
    mask[..., 1:3, :] = False
    literals = AttentionLiterals(0.3, window=11 if path == "plain" else 0)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(7))
    plain = [t.double() for t in (q, k, v)]
    expected = reference_forward(*plain, mask, literals, None, sinks.double())[0]
    if path != "plain":
        out = plan.forward(plan.build_plan(q, k, v, mask, literals, sinks), q, k, v, mask, None, sinks,
                           num_splits=3 if path == "split" else 1, pack_gqa=path == "packed")[0]
        assert_close(out, expected, torch.float32)
        return
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = literals.call(*leaves[:3], mask, leaves[3])
    assert out[:, :, 1:3].abs().max() == 0
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert_close(out, expected, torch.float32)
    for grad, want in zip(grads, reference_backward(grad_out.double(), *plain, mask, literals, None, sinks.double())):
        assert_close(grad, want, torch.float32)


def test_output_layout_follows_q():
    """q as a transposed view of [B, L, H, D]: the output is laid out [B, L, H, Dv] so that the
    usual transpose(1, 2).reshape back is free; gradients come back like their inputs."""
    q, k, v = make_qkv(1, 4, 2, 9, 11, 8, 8, torch.float32, "transposed", 0)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torch.ops.fuser.attention(*leaves, None, 0.3, True, 0, True, 0.0, 0.0, -math.inf)
    assert out.transpose(1, 2).is_contiguous()
    out.sum().backward()
    assert all(t.grad.stride() == t.stride() for t in leaves)


def test_unsupported_literals_use_the_reference():
    """Inputs the kernels do not take (float64, scale ≤ 0) still get the formula's answer."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 8, 8, torch.float64, "contiguous", 0)
    for scale in (0.4, -0.4):
        out = torch.ops.fuser.attention(q, k, v, None, scale, True, 0, False, 0.0, 0.0, -math.inf)
        torch.testing.assert_close(out, attention_reference(q, k, v, None, scale, True, 0, False, 0.0, 0.0,
                                                            -math.inf))


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 4, 2, 6, 9, 8, 8, torch.bfloat16, "contiguous", 0)
    mask = make_mask("key_padding", 1, 4, 6, 9, torch.bfloat16, 0)
    check_case(q, k, v, mask, (0.35, True, 0, True, 0.0, 0.0, -math.inf))


def opcheck_samples():
    q, k, v = make_qkv(1, 4, 2, 19, 23, 8, 8, torch.float32, "transposed", 0)
    mask = make_mask("key_padding", 1, 4, 19, 23, torch.float32, 0)
    seed = torch.tensor(3)
    sinks = torch.randn(4)
    return [(q, k, v, None, 0.35, True, 0, False, 0.0, 0.0, -math.inf, "sdpa", None, None),
            (q, k, v, mask, 0.35, False, 4, True, 3.0, 0.2, torch.finfo(torch.float32).min, "add", seed, None),
            (q, k, v, mask, 0.35, True, 0, False, 0.0, 0.0, -math.inf, "fill", None, sinks),
            (q, k, v, make_mask("float", 1, 4, 19, 23, torch.float32, 0)[0, :, :1], 0.35, True, 0, True, 2.0, 0.0,
             -math.inf, "add", None, None)]  # a learned bias [1, 1, Lk]: its gradient summed over B, H and Lq


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
            and (i < 4 or i == 13) else a for i, a in enumerate(opcheck_samples()[sample])]  # a float mask learned
    torch.library.opcheck(torch.ops.fuser.attention_forward.default, args)
    with torch.no_grad():  # no double backward: the backward op takes plain tensors
        out, stats, classes = torch.ops.fuser.attention_forward(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    mask_grad = plain[3] is not None and plain[3].dtype.is_floating_point
    backward_args = (torch.randn_like(out), *plain[:4], out, stats, classes, plain[12], *plain[4:12], plain[13],
                     mask_grad)
    torch.library.opcheck(torch.ops.fuser.attention_backward.default, backward_args)


def test_torch_compile_aot_eager_gives_the_same_values():
    q, k, v = make_qkv(2, 4, 2, 17, 17, 16, 16, torch.float32, "contiguous", 4)
    mask = make_mask("bool_full", 2, 4, 17, 17, torch.float32, 4)

    def fn(q, k, v, mask):
        return torch.ops.fuser.attention(q, k, v, mask, 0.25, True, 0, False, 0.0, 0.0, -math.inf)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    eager = fn(*leaves, mask)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves, mask)
    compiled_grads = torch.autograd.grad(compiled.sum(), leaves)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_tiny_problems_are_not_tuned():
    """Tuning compiles every candidate (seconds each on a GPU); a problem of a few thousand scores gains
    nothing from it, so the pruners keep one candidate there and all that fit elsewhere."""
    import triton

    from fuser.kernels.attention import backward, forward

    candidates = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=2)
                  for m, n in ((64, 64), (64, 32), (32, 64), (128, 64))]
    q = torch.empty(1, dtype=torch.bfloat16)
    sizes = dict(HEAD=HeadBlocks(64, 64, False, False))
    assert len(forward._prune_forward_configs(candidates, dict(Q=q, ROWS_KEY=64, LK_KEY=64), **sizes)) == 1
    assert len(forward._prune_forward_configs(candidates, dict(Q=q, ROWS_KEY=64, LK_KEY=4096), **sizes)) > 1
    tiny, long = dict(Q=q, LQ_KEY=64, LK_KEY=64), dict(Q=q, LQ_KEY=2048, LK_KEY=2048)
    for key_blocks in (True, False):
        assert len(backward._prune_backward_configs(candidates, tiny, key_blocks, **sizes)) == 1
        assert len(backward._prune_backward_configs(candidates, long, key_blocks, **sizes)) > 1
