"""The chunkwise gated delta rule found by structure (issue 15, way 2): transformers' `torch_chunk_gated_delta_rule`
(Qwen3-Next's prefill without flash-linear-attention) under torch.compile(backend="fuser") becomes one
`fuser::gated_delta_rule`: prologue, chunk steps and epilogue as one site. Shapes stay tiny (the interpreter)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

import fuser
from fuser.fuzzing import run_example
from fuser.integrations.transformers import torch_fallback
from fuser.kernels.gated_delta import recurrent_reference
from fuser.patterns.linear_attention import LINEAR_ATTENTION, gated_delta_arguments
from fuser.patterns.linear_attention_chunks import chunk_epilogue, chunk_programs, chunk_prologue, chunk_step
from helpers import compile_and_run, float64_reference
from numerics import assert_close
from test_linear_attention_convert import LINEAR_LAYERS, tiny_qwen3_next, token_ids
from test_linear_attention_graphs import with_gradients

CHUNK = torch_fallback(qwen3_next.torch_chunk_gated_delta_rule)
ONLY = {"patterns": ("linear_attention",), "strict": True}


def inputs(T, B=1, Hk=1, Hv=2, Dk=4, Dv=3, seed=0):
    """transformers' layout: q, k [B, T, Hk, Dk] (unit keys), v [B, T, Hv, Dv], g, beta [B, T, Hv], S0 [B, Hv, Dk, Dv]."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, Hv, Dv, generator=gen)
    return [q, k, v, -torch.rand(B, T, Hv, generator=gen), torch.rand(B, T, Hv, generator=gen),
            torch.randn(B, Hv, Dk, Dv, generator=gen)]


@pytest.mark.parametrize("length", [70, 5])
def test_every_linear_attention_layer_of_qwen3_next_prefills_fused(length):
    """A prefill of tiny Qwen3-Next (T not a multiple of the chunk size 64): each gated delta net layer's chunkwise
    call is one op; logits against the float64 model."""
    model = tiny_qwen3_next()
    ids = token_ids(length)[:1]
    with torch.no_grad():
        logits, report = compile_and_run(model, ids, options=ONLY)
        exact = float64_reference(model)(ids).logits
    assert report.counts() == {"linear_attention": LINEAR_LAYERS}, str(report)
    assert all("chunkwise prefill" in m.mode for m in report.matches), str(report)
    assert_close(logits.logits, exact, torch.float32)


def _rewritten(fn, args):
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(fn, backend="fuser", options={"codegen": "eager", **ONLY})
    outs, grads = with_gradients(compiled, args)
    return outs, grads, fuser.last_report()


@pytest.mark.parametrize("length,chunk,l2norm", [(70, 64, True), (21, 8, False), (16, 8, True)])
def test_transformers_chunk_function_forward_and_backward_against_float64(length, chunk, l2norm):
    """Key-head groups (repeated inside, as 5.24 does), an initial state, the final state, l2norm on and off, chunk
    sizes of 64 and 8 (T = 16: no padding, Dynamo drops the slice); values and every gradient against the gated
    delta recurrence in float64."""
    args = inputs(length)

    def chunked(q, k, v, g, beta, S):
        return CHUNK(q, k, v, g, beta, chunk_size=chunk, initial_state=S, output_final_state=True,
                     use_qk_l2norm_in_kernel=l2norm)

    def exact(q, k, v, g, beta, S):
        return recurrent_reference(q, k, v, g, beta, S, q.shape[-1] ** -0.5, l2norm)
    outs, grads, report = _rewritten(chunked, args)
    assert report.counts() == {"linear_attention": 1}, str(report)
    assert f"in {-(-length // chunk)} chunks of {chunk}" in report.matches[0].mode
    exact_outs, exact_grads = with_gradients(exact, [a.double() for a in args])
    for ours, want in zip(outs + grads, exact_outs + exact_grads):
        assert_close(ours, want, torch.float32)


def test_transformers_5_17_spelling_key_heads_repeated_by_the_caller():
    """5.17's function has no repeat_interleave (its caller repeats the key heads): the same site without it."""
    q, k, v, g, beta, S = inputs(21, Hk=2, Hv=2)

    def chunked(q, k, v, g, beta):
        return CHUNK(q, k, v, g, beta, chunk_size=8, output_final_state=True)
    outs, grads, report = _rewritten(chunked, [q, k, v, g, beta])
    assert report.counts() == {"linear_attention": 1}, str(report)
    exact_outs, _ = with_gradients(lambda *a: recurrent_reference(*a, None, 0.5, False),
                                   [x.double() for x in (q, k, v, g, beta)])
    for ours, want in zip(outs, exact_outs):
        assert_close(ours, want, torch.float32)


def program(q, k, v, g, beta, state, chunk=4, mask_diagonal=1, stop=None, wrong_decay=False, steps=None):
    """The chunkwise code on [B, H, T, ·] inputs with one thing changed, for the negatives."""
    (b, h, length, dk), dv = q.shape, v.shape[-1]
    pad = (chunk - length % chunk) % chunk
    mask = torch.ones(chunk, chunk, dtype=torch.bool).triu(mask_diagonal)
    u, w, qd, attn, decay, kd = chunk_prologue(q, k, v, g, beta, pad, mask, b, h, -1, chunk, dk, dv)
    if wrong_decay:  # the decay of the chunk's first token, not of its last
        cum = torch.nn.functional.pad(g, (0, pad)).reshape(b, h, -1, chunk).cumsum(dim=3)
        decay = cum[..., 0].exp()[..., None, None]
    out = torch.zeros_like(u)
    for i in range(u.shape[2] if steps is None else steps):
        state, out[:, :, i] = chunk_step(state, u[:, :, i], w[:, :, i], qd[:, :, i], attn[:, :, i], decay[:, :, i],
                                         kd[:, :, i])
    return chunk_epilogue(out, (b, h, -1, dv), length if stop is None else stop), state


def _heads_first(T=10):
    q, k, v, g, beta, S = inputs(T, Hk=2)
    return [x.transpose(1, 2).contiguous() for x in (q, k, v, g, beta)] + [S]


def _near_misses(**changed):
    _, report = compile_and_run(lambda *a: program(*a, **changed), *_heads_first())
    assert "linear_attention" not in report.counts(), str(report)
    return [m.reason for m in report.near_misses if m.pattern == "linear_attention"]


def test_the_unchanged_program_is_rewritten():
    _, report = compile_and_run(program, *_heads_first(), options=ONLY)
    assert report.counts() == {"linear_attention": 1}, str(report)


@pytest.mark.parametrize("changed,reason", [
    ({"wrong_decay": True}, "the chunk_decay the steps read (unsqueeze_8) is not made as chunk_prologue makes it"),
    ({"mask_diagonal": 0}, "not ones(4, 4).triu(1)"),
    ({"stop": 9}, "not as [B, H, T] = [1, 2, 10] tokens"),
    ({"steps": 2}, "do not fill"),
])
def test_a_changed_chunkwise_program_is_a_near_miss_naming_why(changed, reason):
    reasons = _near_misses(**changed)
    assert any(reason in r for r in reasons), reasons


@pytest.mark.parametrize("change,reason", [
    ("undecayed", "chunk_prologue matched 39 of its 43 nodes, then: nothing below what matched computes its returned "
                  "value 4"),
    ("squared", "step 0 reads chunk_decay as pow"),
    ("doubled", "no chain of steps reads the tensors chunk_prologue makes (closest step: expected matmul"),
])
def test_changed_chunk_steps_are_a_near_miss_naming_why(change, reason):
    """Steps without the decay (Dynamo then drops the chunk decays: the prologue is there in part), the decay
    squared, the state's prediction doubled (the prologue is whole, the steps read it otherwise)."""
    def changed(q, k, v, g, beta, state, chunk=4):
        (b, h, length, dk), dv = q.shape, v.shape[-1]
        mask = torch.ones(chunk, chunk, dtype=torch.bool).triu(1)
        u, w, qd, attn, decay, kd = chunk_prologue(q, k, v, g, beta, -length % chunk, mask, b, h, -1, chunk, dk, dv)
        out = torch.zeros_like(u)
        for i in range(u.shape[2]):
            predicted = w[:, :, i] @ state
            v_new = u[:, :, i] - (2 * predicted if change == "doubled" else predicted)
            out[:, :, i] = qd[:, :, i] @ state + attn[:, :, i] @ v_new
            decayed = state if change == "undecayed" else state * (decay[:, :, i] ** 2 if change == "squared" else
                                                                    decay[:, :, i])
            state = decayed + kd[:, :, i].transpose(-1, -2) @ v_new
        return chunk_epilogue(out, (b, h, -1, dv), length), state
    _, report = compile_and_run(changed, *_heads_first())
    assert "linear_attention" not in report.counts(), str(report)
    reasons = [m.reason for m in report.near_misses if m.pattern == "linear_attention"]
    assert any(reason in r for r in reasons), reasons


def test_explain_reports_the_chunkwise_site():
    report = fuser.explain(program, *_heads_first())
    assert report.counts().get("linear_attention") == 1, str(report)
    assert "a chunkwise prefill of 10 tokens in 3 chunks of 4" in str(report)


@settings(max_examples=3, deadline=None)
@given(chunk_programs(gated_delta_arguments))
def test_the_fuzzer_draws_chunkwise_programs(example):
    run_example(LINEAR_ATTENTION, example)
