"""`fuser::gated_delta_rule` against the per-token recurrence in float64: outputs, final states, gradients.

The Triton kernels run through the interpreter (conftest.py) at small shapes: the recurrent kernel up to
RECURRENT_MAX_TOKENS tokens, the chunkwise kernels (64-token chunks at these head dims) past it.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
import transformers.models.qwen3_next.modeling_qwen3_next as qwen3_next
from hypothesis import assume, given, settings

from fuser.integrations.transformers import torch_fallback
from fuser.kernels import gated_delta
from fuser.kernels.gated_delta import RECURRENT_MAX_TOKENS, chunked_reference, recurrent_reference
from fuser.patterns.linear_attention import DECAYS, gated_delta_arguments
from fuser.kernels.gated_delta.chunk import unit_lower_inverse
from numerics import assert_close, on_kernel_device, rel_l2, tolerance

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make(batch=1, length=5, heads_k=1, groups=2, dk=16, dv=16, dtype=torch.float32, decay="mixed", l2norm=True,
         initial=True, seed=0):
    """Arguments of the op (float32 g, as transformers computes it)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)
    heads = heads_k * groups
    low, high = DECAYS[decay]
    g = low + (high - low) * torch.rand(batch, length, heads, generator=generator)
    beta = torch.rand(batch, length, heads, generator=generator).to(dtype)
    state = torch.randn(batch, heads, dk, dv, generator=generator) if initial else None
    key_scale = 1.0 if l2norm else dk ** -0.5
    return (randn(batch, length, heads_k, dk), randn(batch, length, heads_k, dk, scale=key_scale),
            randn(batch, length, heads, dv), g, beta, state, dk ** -0.5, l2norm)


def float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def assert_matches_recurrence(args):
    out, final = torch.ops.fuser.gated_delta_rule(*args)
    ref_out, ref_final = recurrent_reference(*float64(args))
    dtype = args[0].dtype
    assert out.dtype == dtype and final.dtype == torch.float32
    assert out.shape == ref_out.shape and final.shape == ref_final.shape
    assert_close(out, ref_out, dtype)
    assert_close(final, ref_final, dtype)


@pytest.mark.parametrize("length", [1, 3, RECURRENT_MAX_TOKENS, RECURRENT_MAX_TOKENS + 1, 64, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths_and_dtypes(length, dtype):
    """Decode-sized calls (the recurrent kernel) and prefill past, at and across chunk boundaries."""
    assert_matches_recurrence(make(length=length, dtype=dtype))


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("length", [7, 100])
def test_decays(decay, length):
    """exp(g) from 1 (no decay) to 1e-9 (the state forgotten at each token)."""
    assert_matches_recurrence(make(length=length, decay=decay))


@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("length", [9, 70])
def test_normalization_and_initial_state(l2norm, initial, length):
    assert_matches_recurrence(make(length=length, l2norm=l2norm, initial=initial, heads_k=2, groups=1, dk=32))


@pytest.mark.parametrize("length", [4, 67])
def test_grouped_heads_and_odd_head_dims(length):
    """Three value heads per key head (value head h reads key head h // 3); head dims 24 and 40."""
    assert_matches_recurrence(make(batch=2, length=length, heads_k=2, groups=3, dk=24, dv=40))


@pytest.mark.parametrize("length", [5, 80])
def test_beta_extremes(length):
    """β = 0 (nothing written) and β = 1 (the old value at k overwritten) on every token; decays near 1, so
    that with nothing written the initial state stays above float32's range."""
    for value in (0.0, 1.0):
        q, k, v, g, beta, state, scale, l2norm = make(length=length, decay="near one")
        assert_matches_recurrence((q, k, v, g, torch.full_like(beta, value), state, scale, l2norm))


@pytest.mark.parametrize("length", [6, 75])
def test_strided_inputs(length):
    """q, k, v as transformers hands them: views of one [B, T, 2·Dk·Hk + Dv·Hv] projection (row stride ≠ width);
    g, beta transposed views."""
    q, k, v, g, beta, state, scale, l2norm = make(length=length, heads_k=2, groups=2)
    mixed = torch.cat([x.flatten(2) for x in (q, k, v)], dim=-1)
    widths = [q[0, 0].numel(), k[0, 0].numel(), v[0, 0].numel()]
    q2, k2, v2 = (part.unflatten(-1, x.shape[2:]) for part, x in zip(mixed.split(widths, dim=-1), (q, k, v)))
    g2, beta2 = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (g, beta))
    assert not q2.is_contiguous() and not g2.is_contiguous()
    assert_matches_recurrence((q2, k2, v2, g2, beta2, state, scale, l2norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels; the reference
@pytest.mark.parametrize("initial", [True, False])
def test_no_tokens(dtype, initial):
    """transformers 5.25 chunks no tokens where the cache keeps the state after each token: an empty output and
    the initial state (zeros without one), in a tensor of its own."""
    q, k, v, g, beta, state, scale, l2norm = make(length=0, initial=initial, dtype=dtype)
    state = None if state is None else state.to(dtype)
    out, final = torch.ops.fuser.gated_delta_rule(q, k, v, g.to(dtype), beta, state, scale, l2norm)
    assert out.shape == v.shape and out.dtype == dtype
    expected = torch.zeros(final.shape) if state is None else state
    assert torch.equal(final, expected.to(final.dtype))
    assert state is None or final.data_ptr() != state.data_ptr()


@given(gated_delta_arguments(max_length=90, max_head_dim=33))
def test_drawn_arguments(args):
    assert_matches_recurrence(args)


# ---------------------------------------------------------------------------------------------
# (I + A)⁻¹, the chunk's WY system
# ---------------------------------------------------------------------------------------------

@triton.jit
def _inverse_kernel(a_ptr, out_ptr, CHUNK: tl.constexpr):
    offsets = tl.arange(0, CHUNK)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    tl.store(out_ptr + offsets, unit_lower_inverse(tl.load(a_ptr + offsets), CHUNK, "ieee"))


def chunk_system(chunk, rows, decay, beta, spread=1.0, seed=0):
    """A of a chunk as the kernels build it (float64): β_i (k̂_i·k̂_j) exp(G_i − G_j) below the diagonal, head
    dim 32, keys a common direction plus `spread` times noise (small: near-equal keys); 0 past `rows`."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 32, generator=generator, dtype=torch.float64) \
        + spread * torch.randn(chunk, 32, generator=generator, dtype=torch.float64)
    keys = torch.nn.functional.normalize(keys, dim=-1)
    low, high = DECAYS[decay]
    log_decay = (low + (high - low) * torch.rand(chunk, generator=generator, dtype=torch.float64)).cumsum(0)
    betas = torch.rand(chunk, generator=generator, dtype=torch.float64) if beta == "drawn" else \
        torch.full((chunk,), float(beta), dtype=torch.float64)
    a = (betas[:, None] * (keys @ keys.T) * (log_decay[:, None] - log_decay[None, :]).exp()).tril(-1)
    a[rows:], a[:, rows:] = 0.0, 0.0
    return a


@pytest.mark.parametrize("chunk, rows", [(64, 64), (64, 45), (64, 7), (32, 32), (32, 20)])
@pytest.mark.parametrize("decay, beta, spread", [("none", 1.0, 1.0), ("none", 1.0, 1e-2), ("near one", "drawn", 0.1),
                                                 ("mixed", "drawn", 1.0), ("near zero", "drawn", 1.0),
                                                 ("none", 0.0, 1.0)])
def test_unit_lower_inverse(chunk, rows, decay, beta, spread):
    """The blocked inverse against torch.linalg.inv in float64, within float32's tolerance: strong and weak
    decays, β 0, 1 and drawn, near-equal keys (the inverse's entries ±1 over terms that cancel), a partial chunk."""
    a = chunk_system(chunk, rows, decay, beta, spread)
    exact = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + a)
    a32, out = on_kernel_device(a.float(), torch.empty(chunk, chunk))
    _inverse_kernel[(1,)](a32, out, CHUNK=chunk)
    assert_close(out, exact, torch.float32)


def test_whole_chunk_doubling_product_fails_near_equal_keys():
    """Why unit_lower_inverse doubles blocks of the inverse, not powers of A: (I − A)(I + A²)…(I + A³²) in
    float32 over the whole chunk is far off for near-equal keys with β 1 (its partial products reach ~1e17)."""
    a = chunk_system(64, 64, "none", 1.0, spread=1e-2)
    eye = torch.eye(64, dtype=torch.float32)
    product, power = eye - a.float(), a.float()
    for _ in range(5):
        power = power @ power
        product = product @ (eye + power)
    assert rel_l2(product, torch.linalg.inv(torch.eye(64, dtype=torch.float64) + a)) > 1.0


# ---------------------------------------------------------------------------------------------
# The references
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_reference_is_the_recurrence(chunk):
    args = float64(make(batch=2, length=37, heads_k=2, groups=2, dv=8))
    for ours, recurrence in zip(chunked_reference(*args, chunk=chunk), recurrent_reference(*args)):
        assert rel_l2(ours, recurrence) < 1e-12


@pytest.mark.parametrize("l2norm", [True, False])
def test_recurrence_is_transformers(l2norm):
    """transformers' fallbacks (which compute in float32 whatever they are given) against ours in float64."""
    q, k, v, g, beta, state, _, _ = float64(make(length=21, l2norm=l2norm))
    ours = recurrent_reference(q, k, v, g, beta, state, q.shape[-1] ** -0.5, l2norm)
    grouped_q, grouped_k = q.repeat_interleave(2, dim=2), k.repeat_interleave(2, dim=2)  # make's 2 value heads a key
    chunked = torch_fallback(qwen3_next.torch_chunk_gated_delta_rule)(grouped_q, grouped_k, v, g, beta, 8, state, True,
                                                                      l2norm)
    recurrent = transformers_recurrent(q, k, v, g, beta, state, q.shape[-1] ** -0.5, l2norm)
    for theirs in (chunked, recurrent):
        assert rel_l2(theirs[0], ours[0]) < 1e-5 and rel_l2(theirs[1], ours[1]) < 1e-5


def test_decay_per_key_channel():
    """g [B, T, H, Dk]: equal channels are the per-head decay; one channel decayed to nothing forgets
    exactly that row of the state."""
    q, k, v, g, beta, state, scale, l2norm = float64(make(length=6))
    per_head = recurrent_reference(q, k, v, g, beta, state, scale, l2norm)
    per_channel = recurrent_reference(q, k, v, g[..., None].expand(*g.shape, q.shape[-1]), beta, state, scale, l2norm)
    assert rel_l2(per_channel[1], per_head[1]) < 1e-14
    zero_k = torch.zeros_like(k)
    forgetting = torch.zeros(*g.shape, q.shape[-1], dtype=torch.float64)
    forgetting[..., 0] = float("-inf")
    _, final = recurrent_reference(q, zero_k, v, forgetting, beta, state, scale, l2norm)
    assert torch.equal(final[:, :, 0], torch.zeros_like(final[:, :, 0]))
    assert torch.equal(final[:, :, 1:], state[:, :, 1:])


# ---------------------------------------------------------------------------------------------
# Gradients, fake functions, errors
# ---------------------------------------------------------------------------------------------

def _gradients(function, args, grad_out, grad_state):
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out, final = function(*leaves)
    torch.autograd.backward([o for o, gr in ((out, grad_out), (final, grad_state)) if gr is not None],
                            [gr for gr in (grad_out, grad_state) if gr is not None])
    return [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad  # q does not reach the final state
            for leaf in leaves[:6] if isinstance(leaf, torch.Tensor)]


def transformers_recurrent(q, k, v, g, beta, initial_state, scale, l2norm):
    """transformers' own per-token fallback (float32 inside), as the op is called (scale = Dk^-0.5), with the key
    heads repeated to the value heads as Qwen3-Next does before calling it (some versions take no key-head groups)."""
    assert scale == q.shape[-1] ** -0.5
    groups = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    return torch_fallback(qwen3_next.torch_recurrent_gated_delta_rule)(q, k, v, g, beta, initial_state, True, l2norm)


def assert_gradients_match(args, which="both", seed=1):
    """Gradients of every input from the op against autograd through the float64 recurrence: within the dtype's
    tolerance, or twice the error of transformers' own fallback where that is larger (the contract's floor: a
    one-element key's l2norm has an eps-sized gradient that float32 gets to a few digits only)."""
    out, final = recurrent_reference(*float64(args))
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=generator).to(args[0].dtype) if which != "state" else None
    grad_state = torch.randn(final.shape, generator=generator) if which != "out" else None
    ours = _gradients(torch.ops.fuser.gated_delta_rule, args, grad_out, grad_state)
    theirs = _gradients(transformers_recurrent, args, grad_out, grad_state)
    ref = _gradients(recurrent_reference, float64(args), *float64((grad_out, grad_state)))
    for mine, own, exact, x in zip(ours, theirs, ref, args):
        assert mine.dtype == x.dtype
        assert_close(mine, exact, x.dtype, max(tolerance(x.dtype), 2 * rel_l2(own, exact)))


@pytest.mark.parametrize("which", ["both", "out", "state"])
def test_gradients(which):
    """The Triton backward across three chunks; decays near 1, so that the initial state's gradient from the
    final state stays within float32's range."""
    assert_gradients_match(make(length=150, heads_k=1, groups=2, dv=8, decay="near one"), which)


@pytest.mark.parametrize("case", [
    dict(length=1), dict(length=5, l2norm=False), dict(length=70, dtype=torch.bfloat16),
    dict(length=40, dtype=torch.float16, initial=False), dict(length=66, heads_k=2, groups=3, dk=24, dv=40),
    dict(length=90, decay="near zero"), dict(length=64, decay="none")])
def test_gradients_of_every_kind_of_call(case):
    assert_gradients_match(make(**case))


@settings(max_examples=6)
@given(gated_delta_arguments(max_length=70, max_head_dim=24))
def test_drawn_gradients(args):
    """Not for one-element l2-normalized keys: their gradient is eps-sized (x̂ = ±1 up to 4e-7), which float32
    resolves to a few percent whichever way it is rounded (transformers' fallback: 2%, the kernel: 6%)."""
    assume(args[0].shape[-1] > 1 or not args[7])
    assert_gradients_match(args)


def test_float64_gradients_recompute_in_segments(monkeypatch):
    """Float64 inputs take the reference backward: autograd through the chunkwise form, here three segments of
    one chunk each."""
    monkeypatch.setattr(gated_delta.reference, "SEGMENT_CHUNKS", 1)
    assert_gradients_match(float64(make(length=150, heads_k=1, groups=2, dv=8, decay="near one")))


def test_no_initial_state_gets_no_gradient_and_fake_matches():
    args = make(length=20, dtype=torch.bfloat16, initial=False)
    out, final = torch.ops.fuser.gated_delta_rule(*args)
    with torch._subclasses.FakeTensorMode() as mode:
        fake_out, fake_final = torch.ops.fuser.gated_delta_rule(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                                   else a for a in args))
    assert (fake_out.shape, fake_out.dtype, fake_final.shape, fake_final.dtype) == \
        (out.shape, out.dtype, final.shape, final.dtype)
    grads = _gradients(torch.ops.fuser.gated_delta_rule, args, torch.ones_like(out), None)
    assert len(grads) == 5 and all(g is not None and g.dtype == a.dtype for g, a in zip(grads, args))


def test_compiled_call_matches_eager():
    args = make(length=19, heads_k=1, groups=2)
    compiled = torch.compile(lambda *a: torch.ops.fuser.gated_delta_rule(*a), backend="aot_eager", fullgraph=True)
    for ours, eager in zip(compiled(*args), torch.ops.fuser.gated_delta_rule(*args)):
        assert torch.equal(ours, eager)


def test_float64_runs_the_reference():
    args = float64(make(length=30))
    out, final = torch.ops.fuser.gated_delta_rule(*args)
    assert out.dtype == final.dtype == torch.float64
    assert rel_l2(out, recurrent_reference(*args)[0]) < 1e-12


@pytest.mark.parametrize("change, message", [
    (lambda a: (*a[:3], a[3][..., None].expand(*a[3].shape, 16), *a[4:]), "one decay per head"),
    (lambda a: (a[0], a[1], a[2][:, :, :1].expand(-1, -1, 3, -1), *a[3:]), "multiple of key heads"),
    (lambda a: (*a[:5], a[5][:, :, :8], *a[6:]), "initial_state must be"),
])
def test_arguments_it_does_not_take(change, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fuser.gated_delta_rule(*change(make(heads_k=2, groups=1)))
