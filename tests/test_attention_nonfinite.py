"""NaN and ±inf in `fuser::attention` follow one rule whatever the tiling (kernels/attention/reference.py): a value
at a position a row cannot see never reaches that row; what a row sees propagates as in the naive code.

The real kernels run (under the interpreter on a CPU, compiled on a GPU) at 160 keys, with blocks of 16, 32 or 64 so
that the same positions
fall in different tiles: the rows that come out non-finite are the rows that see a non-finite value (the naive
matmul puts 0·NaN = NaN into every row, the tiled kernels used to put it into the rows of its tile), and values
and gradients equal the float64 reference of the rule, NaN and ±inf included.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton

from fuser.kernels.attention import AttentionLiterals, backward, forward, plan
from fuser.kernels.runtime import launching
from fuser.kernels.attention.reference import reference_backward, reference_forward
from numerics import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's log2(0) on padding rows

LK, D, NAN_QUERY = 160, 16, 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FINFO_MIN = torch.finfo(torch.float32).min


def _setup(name: str):
    """(literals, mask, lq, [Lq, Lk] bool: who sees what, keys some rows see, keys no row sees)."""
    lk = LK
    lq = 128 if name == "causal, fewer queries" else lk
    rows, keys = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    mask = None
    if name in ("causal", "causal, fewer queries"):
        literals, sees = AttentionLiterals(0.25, causal=True), keys <= rows
        seen, unseen = (100, 120) if lq < lk else (150, 60), (150, 140) if lq < lk else ()
    elif name == "sliding window":
        literals, sees = AttentionLiterals(0.25, causal=True, window=24), (keys <= rows) & (rows - keys < 24)
        seen, unseen = (40, 150), ()
    elif name == "key padding":
        padded = (keys >= 100) & (keys < 120)
        literals, sees, mask = AttentionLiterals(0.25, causal=True, mask_value=FINFO_MIN), (keys <= rows) & ~padded, \
            ~padded[None, None]
        seen, unseen = (150, 30), (110, 105)
    elif name == "left padding":  # rows 0..19 see nothing: with a finite fill they average every key
        padded = keys < 20
        literals, sees, mask = AttentionLiterals(0.25, causal=True, mask_value=FINFO_MIN), (keys <= rows) & ~padded, \
            ~padded[None, None]
        seen, unseen = (150, 30), (10, 15)
    else:  # an HF-style float mask: 0 where seen, finfo.min elsewhere (random holes, key 110 padded)
        sees = torch.rand(lq, lk, generator=torch.Generator().manual_seed(3)) > 0.4
        sees[:, 110] = False
        literals, mask = AttentionLiterals(0.25), torch.where(sees, 0.0, FINFO_MIN)[None, None]
        seen, unseen = (70, 20), (110,)
    return literals, None if mask is None else mask.to(DEVICE), lq, sees, seen, unseen


def _inputs(lq: int, seen: tuple, unseen: tuple):
    """q [1, 2, Lq, D], k, v [1, 1, Lk, D]: NaN in V at the first seen key, +inf in K at the second, NaN and ±inf
    in V and K at the unseen keys, NaN in query row NAN_QUERY of head 0."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, lq, D, generator=generator)
    k, v = (torch.randn(1, 1, LK, D, generator=generator) for _ in range(2))
    q[0, 0, NAN_QUERY] = math.nan
    for key, tensor, value in zip(seen, (v, k), (math.nan, math.inf)):
        tensor[0, 0, key] = value
    for key, value in zip(unseen, (math.nan, math.inf)):
        v[0, 0, key] = value
        k[0, 0, key] = -value
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.fixture
def blocks(monkeypatch):
    """Run the autotuned kernels with BLOCK_M × BLOCK_N blocks (the interpreter's config is 16 × 16)."""
    def use(block_m: int, block_n: int):
        config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
        for kernel in (forward.attention_forward_kernel, backward.attention_dkdv_kernel, backward.attention_dq_kernel):
            monkeypatch.setattr(kernel, "configs", [config])
            monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(launching, "_REPLAYS", {})  # a replay would keep the blocks it was recorded with
    return use


# masks read as tensors need blocks within the 32 × 32 tile-class cells of the interpreter
CASES = [(name, size) for name in ("causal", "causal, fewer queries", "sliding window") for size in (16, 64)] + [
    (name, size) for name in ("key padding", "left padding", "float mask") for size in (16, 32)]


@pytest.mark.parametrize("name, size", CASES, ids=[f"{name}-{size}" for name, size in CASES])
def test_values_reach_only_the_rows_that_see_them(name, size, blocks):
    blocks(size, size)
    literals, mask, lq, sees, seen, unseen = _setup(name)
    q, k, v = _inputs(lq, seen, unseen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = literals.call(*leaves, mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = [grad.cpu() for grad in torch.autograd.grad(out, leaves, grad_out)]
    out = out.cpu()

    sees_nothing = ~sees.any(-1)  # such rows weigh every key (a finite fill): everything reaches them
    reaches = sees | sees_nothing[:, None]
    expected = reaches[:, list(seen + unseen)].any(-1)
    nonfinite_rows = ~out[0].isfinite().all(-1)  # [heads, Lq]
    assert torch.equal(nonfinite_rows[1], expected)
    expected[NAN_QUERY] = True  # the query itself is NaN in head 0
    assert torch.equal(nonfinite_rows[0], expected)
    dq_nonfinite_rows = ~grads[0][0].isfinite().all(-1)  # dQ of a row: what the row sees
    assert torch.equal(dq_nonfinite_rows[:, ~sees_nothing], nonfinite_rows[:, ~sees_nothing])
    assert (grads[0][0][:, sees_nothing] == 0).all()  # their scores were replaced: no gradient
    if not sees_nothing.any():  # a key no row sees gets no gradient
        for grad in grads[1:]:
            assert (grad[0, 0, list(unseen)] == 0).all()

    plain = [t.double() for t in (q, k, v)]
    mask64 = None if mask is None or mask.dtype == torch.bool else mask.double()
    ref, _ = reference_forward(*plain, mask if mask64 is None else mask64, literals)
    assert_close(out, ref, torch.float32)
    ref_grads = reference_backward(grad_out.double(), *plain, mask if mask64 is None else mask64, literals)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("name", ["causal, fewer queries", "key padding", "float mask"])
def test_keys_no_row_sees_give_no_nan_in_gradients(name):
    """NaN and ±inf in K (and Q rows' own keys) at keys no row sees: the forward replaces those scores, and the
    backward forms no dS·K product with them (a dot would put 0·NaN into the dQ of every row of the tile)."""
    literals, mask, lq, _, _, unseen = _setup(name)
    q, k, v = _inputs(lq, (), unseen)
    q[0, 0, NAN_QUERY] = 0.5
    v[0, 0, list(unseen)] = 1.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = literals.call(*leaves, mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert out.isfinite().all()
    for grad in grads:
        assert grad.isfinite().all()


@pytest.mark.parametrize("pack_gqa", [True, False])
def test_split_keys_follow_the_rule(pack_gqa):
    """The decode paths (keys split across programs, query heads packed, partial softmaxes merged): NaN and
    ±inf at padded keys reach no row."""
    literals, mask, _, _, _, unseen = _setup("key padding")
    q, k, v = _inputs(LK, (), unseen)
    q = q[:, :, -3:]  # three decode queries, at the last positions
    literals = literals._replace(bottom_right=True)
    out, _, _ = plan.forward(plan.build_plan(q, k, v, mask, literals), q, k, v, mask, None, num_splits=3,
                             pack_gqa=pack_gqa)
    assert out.isfinite().all()
    ref, _ = reference_forward(q.double(), k.double(), v.double(), mask, literals)
    assert_close(out, ref, torch.float32)
