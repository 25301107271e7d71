"""MLA decode found in traced graphs (issue 16): under torch.compile(backend="fuser") a DeepSeek-V3 decode step's
expansion of the cached latent (kv_b_proj, the split, the keys joined with k_pe) and the attention over it become
one `fuser::mla_decode` on the latent; prefill and masked steps keep the expanded form."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fuser
from fuser.models import tiny_inputs, tiny_model
from helpers import compile_and_run, float64_reference
from numerics import assert_close
from test_latent_attention_convert import _prefilled

LAYERS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("deepseek_v3", layers=LAYERS, attn_implementation="sdpa")


def _step(model, prompt, tokens, dynamic=None):
    """(logits of `tokens` after `prompt` compiled with fuser, the report, the same in float64 eagerly)."""
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(model, backend="fuser", dynamic=dynamic, options={"codegen": "eager", "strict": True})
    with torch.no_grad():
        logits = compiled(tokens, past_key_values=_prefilled(model, prompt)).logits
        exact = float64_reference(model)(tokens, past_key_values=_prefilled(model, prompt, torch.float64)).logits
    return logits, fuser.last_report(), exact


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_decode_step_decodes_in_the_latent_space(model, dynamic):
    """Every layer's expansion + attention is one mla_decode (the context symbolic under dynamic=True)."""
    prompt, token = tiny_inputs(model, batch=2, length=6), tiny_inputs(model, batch=2, length=1, seed=1)
    logits, report, exact = _step(model, prompt, token, dynamic)
    assert report.counts().get("latent_attention") == LAYERS and "attention" not in report.counts(), report
    assert all(m.op == "fuser::mla_decode" for m in report.matches if m.pattern == "latent_attention")
    assert_close(logits, exact, torch.float32)


def test_prefill_stays_expanded(model):
    prompt = tiny_inputs(model, batch=2, length=6)
    _, report = compile_and_run(model, prompt, options={"strict": True})
    assert "latent_attention" not in report.counts(), report
    misses = [n.reason for n in report.near_misses if n.pattern == "latent_attention"]
    assert len(misses) == LAYERS and all("prefill" in reason for reason in misses), misses


def test_several_new_tokens_take_a_mask_and_stay_expanded(model):
    """Two new tokens after a cache: transformers builds a mask tensor, which the graph rewrite does not read
    (fuser.convert's door does): a near miss, and the same logits as float64."""
    prompt, tokens = tiny_inputs(model, batch=2, length=6), tiny_inputs(model, batch=2, length=2, seed=2)
    logits, report, exact = _step(model, prompt, tokens)
    assert "latent_attention" not in report.counts(), report
    assert any("mask" in n.reason for n in report.near_misses if n.pattern == "latent_attention"), report
    assert_close(logits, exact, torch.float32)


def test_greedy_generate_under_torch_compile_is_identical(model):
    """generate() with the forward compiled: prefill expanded, every decode step (recompiled with a symbolic
    context) in the latent space, the same tokens."""
    prompt = tiny_inputs(model, batch=2, length=6)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled.forward = torch.compile(compiled.forward, backend="fuser", options={"codegen": "eager"})
    with torch.no_grad():
        tokens = compiled.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, expected)
    assert fuser.last_report().counts().get("latent_attention", 0) >= LAYERS, fuser.last_report()


B, L, H, R, NOPE, V, ROPE = 2, 9, 3, 20, 6, 5, 4


def own_mla(latent, weight, k_pe, query, bias=None):
    """A user's own MLA decode step, the keys joined by torch.cat."""
    kv = F.linear(latent, weight, bias).view(latent.shape[0], latent.shape[2], -1, NOPE + V).transpose(1, 2)
    k_nope, value = torch.split(kv, [NOPE, V], dim=-1)
    key = torch.cat((k_nope, k_pe.expand(-1, kv.shape[1], -1, -1)), dim=-1)
    return F.scaled_dot_product_attention(query, key, value, scale=0.3)


def _own_inputs(rope_heads=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 1, L, R, generator=gen), torch.randn(H * (NOPE + V), R, generator=gen) * R ** -0.5,
            torch.randn(B, rope_heads, L, ROPE, generator=gen), torch.randn(B, H, 1, NOPE + ROPE, generator=gen))


def test_a_hand_written_decode_step_with_cat_is_rewritten():
    args = _own_inputs()
    out, report = compile_and_run(own_mla, *args, options={"strict": True})
    assert report.counts() == {"latent_attention": 1}, report
    assert_close(out, own_mla(*(a.double() for a in args)), torch.float32)


@pytest.mark.parametrize("case", ["rope per head", "bias"])
def test_what_is_not_the_expansion_is_not_rewritten(case):
    """k_pe already per head (nothing is shared over the heads), kv_b_proj with a bias (W_UK, W_UV would not
    be all of it): the attention stays what it was."""
    args = _own_inputs(rope_heads=H if case == "rope per head" else 1)
    kwargs = {"bias": torch.randn(H * (NOPE + V))} if case == "bias" else {}
    out, report = compile_and_run(own_mla, *args, **kwargs)
    assert "latent_attention" not in report.counts(), report
    assert_close(out, own_mla(*(a.double() for a in args), **{k: v.double() for k, v in kwargs.items()}),
                 torch.float32)


def test_fuzz_latent_attention():
    result = fuser.fuzz("latent_attention", max_examples=6, seed=0, grads=False)
    assert result.ok, result.failure
