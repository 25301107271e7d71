"""transformers' gated delta net layers (tiny Qwen3-Next, built from its config) switched to
`fuser::gated_delta_rule` by `fuser.integrations.linear_attention.convert_linear_attention`."""
from __future__ import annotations

import copy
import inspect
import pickle
import types

import pytest
import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

import fuser
from fuser.integrations import linear_attention
from fuser.integrations.transformers import torch_fallback
from fuser.kernels.gated_delta import recurrent_reference
from fuser.report import Report
from helpers import float64_reference
from numerics import assert_close

LINEAR_LAYERS = 2


def tiny_qwen3_next(**overrides) -> torch.nn.Module:
    """Two gated delta net layers (2 key heads, 4 value heads) and one attention layer, MoE MLPs."""
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, num_hidden_layers=LINEAR_LAYERS + 1,
                    layer_types=["linear_attention"] * LINEAR_LAYERS + ["full_attention"],
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
    torch.manual_seed(0)
    return Qwen3NextForCausalLM(Qwen3NextConfig(**{**settings, **overrides})).eval()


@pytest.fixture(scope="module")
def converted():
    """(original, its float64 copy, the converted copy, the report): the conversion runs once for the module."""
    original = tiny_qwen3_next()
    model, report = copy.deepcopy(original), Report()
    linear_attention.convert_linear_attention(model, report)
    return original, float64_reference(original), model, report


def token_ids(length: int = 11) -> torch.Tensor:
    return torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(0))


def test_every_linear_attention_layer_switches(converted):
    _, _, model, report = converted
    assert report.counts() == {"linear_attention": LINEAR_LAYERS} and not report.near_misses
    fused = [m for m in model.modules() if isinstance(m, linear_attention.RebindsKernelFunctions)]
    assert len(fused) == LINEAR_LAYERS and all(type(m).__name__ == "FusedQwen3NextGatedDeltaNet" for m in fused)


def test_logits_against_float64(converted):
    """Prefill (chunkwise kernels: 30 tokens) and a cached decode step (recurrent kernel)."""
    _, reference, model, _ = converted
    ids = token_ids(30)
    with torch.no_grad():
        ours, exact = model(ids, use_cache=True), reference(ids, use_cache=True)
        assert_close(ours.logits, exact.logits, torch.float32)
        step = token_ids(1)
        ours = model(step, cache=ours.past_key_values, use_cache=True)
        exact = reference(step, cache=exact.past_key_values, use_cache=True)
    assert_close(ours.logits, exact.logits, torch.float32)


def test_generate_gives_the_same_tokens(converted):
    original, _, model, _ = converted
    ids = token_ids()
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       original.generate(ids, max_new_tokens=4, do_sample=False))


def test_a_converted_layer_copies_and_pickles_converted(converted):
    layer = converted[2].model.layers[0].linear_attn
    for again in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(again) is type(layer)
        hidden = torch.randn(1, 5, 64)
        assert torch.equal(again(hidden), layer(hidden))


def test_a_cache_keeping_the_last_tokens_states_against_float64(converted, monkeypatch):
    """Where the cache records its past (speculative decoding), transformers 5.25 keeps the recurrent state after
    each of a call's last tokens: the chunk function takes the tokens before them (none, when each is kept) and
    the recurrent function each of them."""
    _, reference, model, _ = converted
    lengths, fused_call = [], linear_attention.fused_call
    monkeypatch.setattr(linear_attention, "fused_call",
                        lambda arguments: lengths.append(arguments["query"].shape[1]) or fused_call(arguments))
    with torch.no_grad():
        ours, exact = model(token_ids(11), use_cache=True), reference(token_ids(11), use_cache=True)
        caches = [ours.past_key_values, exact.past_key_values]
        if "recurrent_states_to_keep" not in inspect.signature(caches[0].layers[0].activate_past_recording).parameters:
            pytest.skip("this transformers keeps no recurrent states of single tokens (5.25 does)")
        for cache in caches:
            cache.activate_past_recording(recurrent_states_to_keep=2)
        lengths.clear()
        for length in (3, 2):  # 1 and 0 tokens chunked
            step = token_ids(length)
            ours, exact = model(step, cache=caches[0], use_cache=True), reference(step, cache=caches[1], use_cache=True)
            assert_close(ours.logits, exact.logits, torch.float32)
    assert sorted(set(lengths)) == [0, 1], lengths  # by the fused op: no tokens chunked, then single tokens


@pytest.mark.parametrize("name", [linear_attention.CHUNK, linear_attention.RECURRENT])
def test_the_torch_code_behind_transformers_kernel_functions(name):
    """A functools.wraps wrapper without the kernels package, a kernels function module with it (transformers
    5.25 requires it): both lead to the function written in transformers' module."""
    function = torch_fallback(getattr(qwen3_next, name))
    assert inspect.isfunction(function) and not hasattr(function, "__wrapped__")
    assert (function.__name__, inspect.getsourcefile(function)) == (name, inspect.getsourcefile(qwen3_next))


def test_a_kernel_function_it_cannot_see_through_stays_a_near_miss(monkeypatch):
    """A kernels function module of a layout fuser does not know: the layer is left as it was, saying why."""

    class Opaque(torch.nn.Module):
        kernel_layer_name = "chunk_gated_delta_rule"

        def forward(self, *args, **kwargs):
            raise AssertionError("not called")
    monkeypatch.setattr(qwen3_next, linear_attention.CHUNK, Opaque())
    model, report = tiny_qwen3_next(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]), Report()
    linear_attention.convert_linear_attention(model, report)
    assert not report.matches and len(report.near_misses) == 1
    assert "chunk_gated_delta_rule is a kernels function module whose forward calls no `func`" in \
        report.near_misses[0].reason
    assert not isinstance(model.model.layers[0].linear_attn, linear_attention.RebindsKernelFunctions)


def test_a_call_it_does_not_implement_runs_transformers_function():
    """Packed sequences (cu_seqlens) are not implemented: the fused function hands the call to transformers',
    which refuses them without flash-linear-attention."""
    fused_chunk = linear_attention.fused_function(qwen3_next.torch_chunk_gated_delta_rule)
    q, k, v = (torch.randn(1, 4, 1, 16) for _ in range(3))
    g, beta = -torch.rand(1, 4, 1), torch.rand(1, 4, 1)
    out, final = fused_chunk(q, k, v, g=g, beta=beta, cu_seqlens=None, output_final_state=True)
    expected = qwen3_next.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True)
    assert_close(out, expected[0], torch.float32)
    assert_close(final, expected[1], torch.float32)
    with pytest.raises(ValueError, match="packed sequences"):
        fused_chunk(q, k, v, g=g, beta=beta, cu_seqlens=torch.tensor([0, 4]))


def test_head_dims_past_the_kernels_stay_a_near_miss():
    model = tiny_qwen3_next(linear_key_head_dim=272, linear_value_head_dim=8, num_hidden_layers=2,
                            layer_types=["linear_attention", "full_attention"])
    report = Report()
    linear_attention.convert_linear_attention(model, report)
    assert not report.matches and len(report.near_misses) == 1
    assert "head dims 272/8" in report.near_misses[0].reason
    assert not isinstance(model.model.layers[0].linear_attn, linear_attention.RebindsKernelFunctions)


def test_dry_run_changes_nothing():
    model, report = tiny_qwen3_next(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]), Report()
    linear_attention.convert_linear_attention(model, report, dry_run=True)
    assert report.counts() == {"linear_attention": 1}
    assert not any(isinstance(m, linear_attention.RebindsKernelFunctions) for m in model.modules())


def _float64_recurrence(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' gated delta functions as the float64 per-token recurrence (tests/test_kernel_gated_delta.py
    holds it equal to them): transformers' own compute in float32 whatever they are given."""
    out, final = recurrent_reference(query, key, value, g, beta, initial_state, query.shape[-1] ** -0.5,
                                     use_qk_l2norm_in_kernel)
    return out, (final if output_final_state else None)


def test_training_gradients_against_float64(converted):
    """The converted model's parameter gradients (through the Triton backward) against the float64 model whose
    gated delta functions are the float64 recurrence."""
    _, reference, model, _ = converted
    reference = copy.deepcopy(reference)  # the module's fixture stays as it is
    for layer in reference.model.layers[:LINEAR_LAYERS]:
        cls = type(layer.linear_attn)
        names = dict.fromkeys(linear_attention.kernel_function_names(cls), _float64_recurrence)
        layer.linear_attn.forward = types.MethodType(linear_attention.rebound(cls.forward, names), layer.linear_attn)
    ids = token_ids(30)
    for m in (model, reference):
        m.zero_grad()
        m(ids).logits.square().mean().backward()
    exact = dict(reference.named_parameters())
    checked = 0
    for name, parameter in model.named_parameters():
        if "linear_attn" in name and parameter.grad is not None:
            assert_close(parameter.grad, exact[name].grad, torch.float32)
            checked += 1
    model.zero_grad(set_to_none=True)
    assert checked == 7 * LINEAR_LAYERS  # dt_bias, A_log, conv1d, in_proj_qkvz, in_proj_ba, norm, out_proj


def test_torch_compile_traces_the_fused_calls_in_one_graph(converted):
    """Dynamo traces a converted layer's forward whole: the fused functions and the op, no graph break."""
    layer = converted[2].model.layers[0].linear_attn
    hidden = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(hidden)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    ops = [n.target for gm in explained.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert {torch.ops.fuser.gated_delta_rule, torch.ops.fuser.gated_delta_rule.default} & set(ops)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, backend="eager", fullgraph=True)(hidden), layer(hidden))


def test_a_bfloat16_model_converts_and_matches_float64():
    """The check runs at the layer's own dtype: bf16 inputs, tf32 dots, the bf16 tolerance."""
    original = tiny_qwen3_next(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    reference, model, report = float64_reference(original), copy.deepcopy(original).to(torch.bfloat16), Report()
    linear_attention.convert_linear_attention(model, report)
    assert report.counts() == {"linear_attention": 1} and not report.near_misses
    ids = token_ids(24)
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, torch.bfloat16)


def test_fuser_convert_switches_the_linear_attention_layers():
    """The public door: fuser.convert finds the gated delta net layers beside norms, MoE and attention."""
    model = tiny_qwen3_next()
    report = fuser.convert(model, dry_run=True)
    assert report.counts().get("linear_attention") == LINEAR_LAYERS, report
