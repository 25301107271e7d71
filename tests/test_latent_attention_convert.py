"""DeepSeek-V3's attention decoding in the latent space after `fuser.convert` (fuser.integrations.latent_attention):
the same tokens from greedy generate(), the same parameters and cache, a fraction of the FLOPs per decode step."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fuser
from fuser.integrations.latent_attention import LatentDecode, convert_latent_attention
from fuser.models import tiny_inputs, tiny_model
from fuser.modules.swap import FusedModule
from fuser.report import Report
from helpers import float64_reference
from numerics import assert_close

LAYERS = 2


def _model():
    return tiny_model("deepseek_v3", layers=LAYERS, max_position_embeddings=512)


def _mla_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.no_grad():
        fn()
    return Counter(e.name for e in profile.events())["fuser::mla_decode"]


@pytest.fixture(scope="module")
def converted():
    model = _model()
    original = copy.deepcopy(model)
    return fuser.convert(model), original


def test_every_layer_switches_with_the_same_parameters(converted):
    model, original = converted
    report = Report()
    convert_latent_attention(_model(), report, dry_run=True)
    assert report.counts() == {"latent_attention": LAYERS} and not report.near_misses, report
    layers = [layer.self_attn for layer in model.model.layers]
    assert all(isinstance(a, FusedModule) and isinstance(a.fuser_call, LatentDecode) for a in layers)
    assert model.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())


def test_greedy_generate_is_identical_and_decodes_in_the_latent_space(converted):
    model, original = converted
    prompt = tiny_inputs(model, batch=2, length=6)
    with torch.no_grad():
        expected = original.generate(prompt, max_new_tokens=4, do_sample=False)
    tokens = []
    assert _mla_calls(lambda: tokens.append(model.generate(prompt, max_new_tokens=4, do_sample=False))) == LAYERS * 3
    assert torch.equal(tokens[0], expected)


def _prefilled(model, prompt, dtype=torch.float32):
    """The cache of `prompt` (filled by the model's own code: the converted model's cache is the same)."""
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return cache


def _decode_step(model, cache, token):
    """(logits of one decode step of `token` after `cache`, FLOPs of that step)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits = model(token, past_key_values=copy.deepcopy(cache), use_cache=True).logits
    return logits, counter.get_total_flops()


def test_a_decode_step_at_context_256_costs_under_half_the_flops(converted):
    model, original = converted
    prompt, token = tiny_inputs(model, batch=1, length=256), tiny_inputs(model, batch=1, length=1, seed=1)
    cache = _prefilled(original, prompt)
    ours, our_flops = _decode_step(model, cache, token)
    theirs, their_flops = _decode_step(original, cache, token)
    exact, _ = _decode_step(float64_reference(original), _prefilled(original, prompt, torch.float64), token)
    assert our_flops <= their_flops / 2, (our_flops, their_flops)
    assert_close(ours, exact, torch.float32)
    assert_close(theirs, exact, torch.float32)


def test_other_calls_run_the_layers_own_forward(converted):
    """Prefill, padding, a mask that is not causal bottom-right, several new tokens without a mask: the layer's
    own code (no mla_decode call), the same result."""
    model, original = converted
    prompt = tiny_inputs(model, batch=2, length=5)
    cache = _prefilled(original, prompt[:, :3])
    assert _mla_calls(lambda: model(prompt)) == 0
    padded = torch.ones_like(prompt)
    padded[0, 0] = 0  # left padding in the first sequence: its mask differs from the second's
    with torch.no_grad():
        theirs = original(prompt[:, 3:], attention_mask=padded, past_key_values=copy.deepcopy(cache)).logits
    ours = []
    assert _mla_calls(lambda: ours.append(model(prompt[:, 3:], attention_mask=padded,
                                                past_key_values=copy.deepcopy(cache)).logits)) == 0
    assert_close(ours[0], theirs.double(), torch.float32)  # (norms and experts converted too)
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(2, 1, model.config.hidden_size)
    lowest = torch.finfo(torch.float32).min
    step = (hidden, (hidden, hidden), torch.zeros(2, 1, 1, 4))
    assert attention.fuser_call.accepts(attention, step, {"cache": copy.deepcopy(cache)})  # additive zeros: all seen
    assert attention.fuser_call.accepts(attention, (*step[:2], None), {"cache": copy.deepcopy(cache)})
    for mask in (torch.zeros(2, 1, 1, 4).index_fill(-1, torch.tensor([1]), lowest),  # a hole in the context
                 torch.full((2, 1, 1, 4), -1.0),  # an additive bias, not a mask
                 torch.ones(2, 1, 1, 4, dtype=torch.int64)):
        assert not attention.fuser_call.accepts(attention, (*step[:2], mask), {"cache": copy.deepcopy(cache)})
    two = torch.randn(2, 2, model.config.hidden_size)
    assert not attention.fuser_call.accepts(attention, (two, (two, two), None), {"cache": copy.deepcopy(cache)})


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def latent_only(request):
    """(a model whose MLA layers alone were converted, the original), one per attention implementation: eager
    hands the layers additive float masks, SDPA bool ones."""
    original = tiny_model("deepseek_v3", layers=LAYERS, attn_implementation=request.param)
    model, report = copy.deepcopy(original), Report()
    convert_latent_attention(model, report)
    assert report.counts() == {"latent_attention": LAYERS}, report
    return model, original


@pytest.mark.parametrize("new_tokens", [1, 2, 5])
def test_new_tokens_after_a_prefill_are_causal_bottom_right(latent_only, new_tokens):
    """Speculative / chunked decode: Lq new tokens after a prefill, causal among themselves (transformers'
    mask), in the latent space and equal to the model in float64."""
    model, original = latent_only
    prompt = tiny_inputs(model, batch=2, length=6)
    tokens = tiny_inputs(model, batch=2, length=new_tokens, seed=4)
    cache = _prefilled(original, prompt)
    logits = []
    assert _mla_calls(lambda: logits.append(model(tokens, past_key_values=copy.deepcopy(cache)).logits)) == LAYERS
    with torch.no_grad():
        exact = float64_reference(original)(tokens, past_key_values=_prefilled(original, prompt, torch.float64)).logits
        theirs = original(tokens, past_key_values=copy.deepcopy(cache)).logits
    assert_close(logits[0], exact, torch.float32)
    assert_close(theirs, exact, torch.float32)


@pytest.mark.parametrize("static", ["cache_implementation", "StaticCache"])
def test_greedy_generate_with_a_static_cache_is_identical(converted, static):
    """transformers' static cache (5.17 and 5.24: the latent [B, 1, max_cache_len, R] as in the dynamic one, the
    slots not yet written masked): decode steps in the latent space over the written slots only."""
    from transformers import StaticCache

    model, original = converted
    prompt = tiny_inputs(model, batch=2, length=6)

    def generate(m):
        cache = ({"cache_implementation": "static"} if static == "cache_implementation"
                 else {"past_key_values": StaticCache(config=m.config, max_cache_len=24)})
        with torch.no_grad():
            return m.generate(prompt, max_new_tokens=4, do_sample=False, **cache)
    expected, tokens = generate(original), []
    assert _mla_calls(lambda: tokens.append(generate(model))) == LAYERS * 3
    assert torch.equal(tokens[0], expected)


def test_a_static_cache_step_agrees_with_float64(latent_only):
    """One step on a static cache with slots to spare (masked, holding zeros) against the model in float64."""
    from transformers import StaticCache

    model, original = latent_only
    prompt, token = tiny_inputs(model, batch=2, length=7), tiny_inputs(model, batch=2, length=1, seed=5)
    outputs = []
    for m in (model, float64_reference(original)):
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            m(prompt, past_key_values=cache)
            positions = torch.arange(7, 8)[None].expand(2, -1)
            step = lambda: outputs.append(m(token, past_key_values=cache, position_ids=positions).logits)  # noqa: E731
            assert _mla_calls(step) == (LAYERS if m is model else 0)
    assert_close(outputs[0], outputs[1], torch.float32)


def test_only_steps_cheaper_absorbed_decode_in_the_latent_space():
    """The rule (FLOPs of both forms, memory favouring the absorbed one): DeepSeek-V3's shapes decode a few
    hundred tokens at most absorbed, never a prefill."""
    from fuser.kernels.mla_decode import latent_is_cheaper

    v3 = dict(latent=512, rope=64, nope=128, v=128)
    assert latent_is_cheaper(1, 4096, **v3) and latent_is_cheaper(64, 4160, **v3)
    assert not latent_is_cheaper(256, 4352, **v3) and not latent_is_cheaper(4096, 4096, **v3)
    assert not latent_is_cheaper(2, 1, **v3) and not latent_is_cheaper(0, 10, **v3)


def test_absorbed_weights_are_kept_until_the_weight_changes(converted):
    model, original = converted
    attention = model.model.layers[0].self_attn
    prompt, token = tiny_inputs(model, batch=1, length=5), tiny_inputs(model, batch=1, length=1, seed=3)
    cache = _prefilled(original, prompt)
    _decode_step(model, cache, token)
    kept = attention._fuser_absorbed
    _decode_step(model, cache, token)
    assert attention._fuser_absorbed is kept
    scaled = [copy.deepcopy(m) for m in (model, original)]
    with torch.no_grad():
        for m in scaled:
            m.model.layers[0].self_attn.kv_b_proj.weight.mul_(1.5)  # in place: a new version of the same storage
    logits, _ = _decode_step(scaled[0], cache, token)
    expected, _ = _decode_step(scaled[1], cache, token)
    first = scaled[0].model.layers[0].self_attn
    assert first._fuser_absorbed[0][1] == first.kv_b_proj.weight._version
    assert_close(logits, expected.double(), torch.float32)


def test_gradients_flow_through_a_decode_step(converted):
    """Decode is inference, but a decode step with gradients gives the layer's own gradients (the op's backward
    is its reference formula)."""
    model, original = converted
    prompt, token = tiny_inputs(model, batch=1, length=12), tiny_inputs(model, batch=1, length=1, seed=2)
    cache = _prefilled(original, prompt)
    grads = []
    for m in (model, original):
        m.zero_grad()
        m(token, past_key_values=copy.deepcopy(cache)).logits.square().sum().backward()
        grads.append(m.model.layers[1].self_attn.kv_b_proj.weight.grad.clone())
        m.zero_grad()
    assert_close(grads[0], grads[1].double(), torch.float32)


def test_a_kv_b_proj_with_bias_is_a_near_miss():
    model = _model()
    attention = model.model.layers[0].self_attn
    attention.kv_b_proj = nn.Linear(attention.kv_lora_rank, attention.kv_b_proj.out_features, bias=True)
    report = Report()
    convert_latent_attention(model, report)
    assert report.counts() == {"latent_attention": LAYERS - 1}
    assert "bias" in report.near_misses[0].reason and not isinstance(attention, FusedModule)
