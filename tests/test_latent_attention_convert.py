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
    """Prefill, several new tokens, a mask tensor: the layer's own code (no mla_decode call), the same result."""
    model, original = converted
    prompt = tiny_inputs(model, batch=2, length=5)
    cache = _prefilled(original, prompt[:, :3])
    assert _mla_calls(lambda: model(prompt)) == 0
    assert _mla_calls(lambda: model(prompt[:, 3:], past_key_values=copy.deepcopy(cache))) == 0
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(2, 1, model.config.hidden_size)
    step = (hidden, (hidden, hidden), torch.zeros(2, 1, 1, 4))
    assert not attention.fuser_call.accepts(attention, step, {"cache": copy.deepcopy(cache)})
    assert attention.fuser_call.accepts(attention, (*step[:2], None), {"cache": copy.deepcopy(cache)})


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
