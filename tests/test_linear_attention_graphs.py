"""The gated delta rule found by structure in traced graphs (issue 15, ways 2 and 3): Dynamo's unrolled loops
(transformers' `torch_recurrent_gated_delta_rule`, a hand-written loop) become one `fuser::gated_delta_rule`.
Lengths stay small: Dynamo unrolls the loops."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

import fuser
from fuser.integrations.transformers import torch_fallback
from helpers import compile_and_run, float64_reference
from numerics import assert_close
from test_linear_attention_convert import LINEAR_LAYERS, tiny_qwen3_next, token_ids

RECURRENT = torch_fallback(qwen3_next.torch_recurrent_gated_delta_rule)


def _takes_key_head_groups() -> bool:
    """Whether this transformers' recurrent fallback repeats the key heads itself (5.17's caller does it)."""
    q = torch.zeros(1, 1, 2, 2)  # 2 key heads, 4 value heads: without the repeat, shapes 2 and 4 meet
    try:
        RECURRENT(q, q, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    except RuntimeError:
        return False
    return True


def inputs(T=3, B=2, H=2, Dk=8, Dv=6, time_first=True, per_key=False, seed=0):
    """S0 [B, H, Dk, Dv]; q, k [T, B, H, Dk] (unit keys), v [T, B, H, Dv], g, beta [T, B, H] (g [T, B, H, Dk]
    per key channel), or time at dim 1 ([B, T, H, D]: transformers' layout)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(T, B, H, Dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(T, B, H, Dv, generator=gen)
    g = -torch.rand(T, B, H, *((Dk,) if per_key else ()), generator=gen)
    beta = torch.rand(T, B, H, generator=gen)
    tensors = (q, k, v, g, beta) if time_first else tuple(x.transpose(0, 1).contiguous() for x in (q, k, v, g, beta))
    return torch.randn(B, H, Dk, Dv, generator=gen), *tensors


def hand_written(S, q, k, v, g, beta):
    """A user's own loop over tokens (time first), outputs stacked."""
    outs = []
    for t in range(q.shape[0]):
        S = S * torch.exp(g[t])[..., None, None]
        kv = (S * k[t].unsqueeze(-1)).sum(dim=-2)
        S = S + k[t].unsqueeze(-1) * ((v[t] - kv) * beta[t][..., None]).unsqueeze(-2)
        outs.append((S * q[t][..., None]).sum(-2))
    return torch.stack(outs), S


def with_gradients(fn, args):
    """fn's outputs and the gradients of a fixed projection of them with respect to every input."""
    args = [a.detach().clone().requires_grad_() for a in args]
    outs = fn(*args)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.dtype) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), args)
    return [o.detach() for o in outs], list(grads)


def assert_rewritten_like_float64(fn, args, count=1):
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(fn, backend="fuser", options={"codegen": "eager", "strict": True})
    outs, grads = with_gradients(compiled, args)
    assert fuser.last_report().counts().get("linear_attention") == count, str(fuser.last_report())
    exact_outs, exact_grads = with_gradients(fn, [a.double() for a in args])
    for ours, exact in zip(outs + grads, exact_outs + exact_grads):
        assert_close(ours, exact, torch.float32)


def concatenated(S, q, k, v, g, beta):
    """The same loop, outputs unsqueezed and concatenated along time (last dim but one)."""
    outs = []
    for t in range(q.shape[0]):
        S, o = _step(S, q[t], k[t], v[t], g[t], beta[t])
        outs.append(o.unsqueeze(-2))
    return torch.cat(outs, dim=2), S


def reused(S, q, k, v, g, beta):
    """A loop body that computes k_t[..., None] once and reads it twice."""
    outs = []
    for t in range(q.shape[0]):
        column = k[t][..., None]
        S = S * g[t].exp()[..., None, None]
        S = S + column * ((v[t] - (S * column).sum(-2)) * beta[t][..., None])[..., None, :]
        outs.append((S * q[t][..., None]).sum(-2))
    return torch.stack(outs), S


@pytest.mark.parametrize("loop", [hand_written, concatenated, reused])
def test_a_hand_written_loop_forward_and_backward_against_float64(loop):
    assert_rewritten_like_float64(loop, inputs(T=4))


def test_a_single_step_is_a_chain():
    assert_rewritten_like_float64(hand_written, inputs(T=1))


@pytest.mark.skipif(not _takes_key_head_groups(), reason="this transformers' fallback takes no key-head groups")
@pytest.mark.parametrize("l2norm", [True, False])
def test_transformers_recurrent_function_with_key_head_groups(l2norm):
    """Value heads twice the key heads (repeat_interleave before the loop), an initial state, the final state."""
    S, q, k, v, g, beta = inputs(T=3, H=4, time_first=False)
    q, k = q[:, :, :2], k[:, :, :2]

    def recurrent(q, k, v, g, beta, S):
        return RECURRENT(q, k, v, g, beta, initial_state=S, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    assert_rewritten_like_float64(recurrent, [q, k, v, g, beta, S])


def test_every_linear_attention_layer_of_qwen3_next_decodes_fused():
    """A cached decode step of tiny Qwen3-Next under torch.compile(backend="fuser"): each gated delta net layer's
    recurrent call is one op; logits against the float64 model."""
    model = tiny_qwen3_next()
    reference = float64_reference(model)
    ids, step = token_ids(6), token_ids(1)
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        model(ids, cache=caches[0], use_cache=True)
        reference(ids, cache=caches[1], use_cache=True)
        logits, report = compile_and_run(model, step, cache=caches[0], use_cache=True,
                                         options={"strict": True})
        exact = reference(step, cache=caches[1], use_cache=True).logits
    assert report.counts()["linear_attention"] == LINEAR_LAYERS, str(report)
    assert_close(logits.logits, exact, torch.float32)


def _near_misses(fn, args):
    _, report = compile_and_run(fn, *args)
    assert "linear_attention" not in report.counts(), str(report)
    return [m.reason for m in report.near_misses if m.pattern == "linear_attention"]


def test_a_step_reading_another_position_is_a_near_miss():
    def shifted(S, q, k, v, g, beta):
        outs = []
        for t in range(q.shape[0]):
            S, o = _step(S, q[0], k[t], v[t], g[t], beta[t])
            outs.append(o)
        return torch.stack(outs), S
    reasons = _near_misses(shifted, inputs(T=3))
    assert any("step 1 reads q at" in r and "consecutive positions" in r for r in reasons), reasons


def test_a_state_read_outside_the_chain_is_a_near_miss():
    def kept_states(S, q, k, v, g, beta):
        outs, states = [], []
        for t in range(q.shape[0]):
            S, o = _step(S, q[t], k[t], v[t], g[t], beta[t])
            outs.append(o)
            states.append(S)
        return torch.stack(outs), torch.stack(states)
    reasons = _near_misses(kept_states, inputs(T=3))
    assert any("is also used outside it" in r for r in reasons), reasons


def test_a_decay_per_key_channel_is_a_near_miss_naming_it():
    def per_key(S, q, k, v, g, beta):
        outs = []
        for t in range(q.shape[0]):
            S = S * g[t].exp()[..., None]
            kv = (S * k[t][..., None]).sum(-2)
            S = S + k[t][..., None] * ((v[t] - kv) * beta[t][..., None])[..., None, :]
            outs.append((S * q[t][..., None]).sum(-2))
        return torch.stack(outs), S
    reasons = _near_misses(per_key, inputs(T=2, per_key=True))
    assert any("per key channel" in r for r in reasons), reasons


def test_linear_attention_without_the_delta_term_is_left_alone():
    def plain(S, q, k, v, g, beta):
        outs = []
        for t in range(q.shape[0]):
            S = S * g[t].exp()[..., None, None] + k[t][..., None] * v[t][..., None, :]
            outs.append((S * q[t][..., None]).sum(-2))
        return torch.stack(outs), S
    _near_misses(plain, inputs(T=2))


def test_outputs_written_into_a_buffer_read_early_are_a_near_miss():
    def peeked(S, q, k, v, g, beta):
        out = torch.zeros(q.shape[0], *v.shape[1:-1], v.shape[-1])
        seen = []
        for t in range(q.shape[0]):
            S, out[t] = _step(S, q[t], k[t], v[t], g[t], beta[t])
            seen.append(out.sum())
        return out, S, torch.stack(seen)
    reasons = _near_misses(peeked, inputs(T=2))
    assert any("while the steps write into it" in r for r in reasons), reasons


def _step(S, q, k, v, g, beta):
    S = S * g.exp()[..., None, None]
    kv = (S * k[..., None]).sum(-2)
    S = S + k[..., None] * ((v - kv) * beta[..., None])[..., None, :]
    return S, (S * q[..., None]).sum(-2)


def test_explain_reports_the_chain():
    report = fuser.explain(hand_written, *inputs(T=2))
    assert report.counts().get("linear_attention") == 1, str(report)
    assert "a recurrence of 2 steps (outputs stacked)" in str(report)


def test_the_fuzzer_draws_loops():
    result = fuser.fuzz("linear_attention", max_examples=4, seed=1)
    assert result.ok, str(result)


def test_fuzzing_a_loop_as_a_model_checks_every_result():
    """`fuser.fuzz(fn, *inputs)`: the chain's outputs and final state, and the gradients of every input."""
    result = fuser.fuzz(hand_written, *inputs(T=3), max_examples=3, seed=0)
    assert result.ok, str(result)
    assert {"out", "dq", "dk", "dv", "dg", "dbeta", "dstate"} <= {k.split(".")[-1] for k in result.worst_error}
