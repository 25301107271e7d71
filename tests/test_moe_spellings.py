"""MoE spellings beyond SwiGLU behind a softmax top-k router (issue 14): GPT-OSS's biased experts with the clamped
SwiGLU, PhiMoE's sparse-mixer router, Llama-4's sigmoid top-1 router with dense experts and a shared expert, and
the loop MoE that Dynamo cannot capture. Tiny transformers models compiled with backend="fuser" (counts, values
and gradients against float64), the new search rows under hypothesis, near misses that name the real cause."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fuser
from fuser.fuzzing import run_example
from fuser.integrations.transformers import experts_call, register
from fuser.models import tiny_gpt_oss, tiny_inputs, tiny_model
import fuser.patterns.moe_pieces as moe_pieces
from fuser.patterns.moe import EXPERTS_SEARCHES, MOE, experts_arguments, routed_example
from helpers import compile_and_run, float64_reference, loss_step
from numerics import assert_close

MOE_ONLY = {"codegen": "eager", "strict": True, "patterns": ["moe_router", "moe"]}


def _gpt_oss(limit=0.5):
    """A tiny GPT-OSS whose clamps bite (its default limit, 7, is rarely reached at these sizes)."""
    model = tiny_gpt_oss()
    for layer in model.model.layers:
        layer.mlp.experts.limit = limit
        with torch.no_grad():
            for p in layer.mlp.experts.parameters():
                p.normal_(0.0, 0.2)
    return model


MODELS = {  # architecture -> (tiny model, what each of its two `moe` sites runs)
    "gpt_oss": (_gpt_oss, "clamped swiglu, interleaved, biased, float32, fed by a top-k router"),
    "phimoe": (lambda: tiny_model("phimoe", intermediate_size=32),
               "swiglu, float32, fed by a sparse-mixer router (one choice per max)"),
    "llama4_text": (lambda: tiny_model("llama4_text", intermediate_size=32),
                    "top-1 of Llama-4's dense sigmoid scores, hidden 64, intermediate 32, swiglu, inputs scaled"),
}


@pytest.mark.parametrize("arch", MODELS)
def test_every_moe_layer_compiles_whole_and_matches_float64(arch):
    make, mode = MODELS[arch]
    model = make()
    ids = tiny_inputs(model, length=5)
    logits, grads, report = loss_step(model, ids, MOE_ONLY)
    assert report.counts() == {"moe": 2}, report
    assert all(mode in m.mode for m in report.matches), report
    ref_logits, ref_grads, _ = loss_step(float64_reference(model), ids)
    assert_close(logits, ref_logits, torch.float32)
    assert any("experts" in name for name in grads) and grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, torch.float32)


def test_gpt_oss_converts_to_the_fuser_experts_implementation():
    """transformers' experts interface on GPT-OSS's transposed, interleaved, biased experts with their clamps."""
    register()
    model = _gpt_oss()
    ids = tiny_inputs(model)
    reference = float64_reference(model)
    assert experts_call(model.model.layers[0].mlp.experts, torch.randn(3, 64))[-3:] == ("clamped_swiglu", 1.702, 0.5)
    report = fuser.convert(model, dry_run=True)
    assert report.counts().get("moe") == 2, report
    assert fuser.convert(model) is model and model.config._experts_implementation == "fuser"
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, torch.float32)


@pytest.mark.parametrize("row", range(1, len(MOE.searches)))
@settings(max_examples=3)
@given(data=st.data())
def test_new_moe_rows_values_and_gradients(row, data):
    """The clamped gatings (interleaved, concatenated) and Llama-4's dense experts, drawn by their strategies."""
    example = data.draw(MOE.searches[row].examples(), label="example")
    errors = run_example(MOE, example)
    assert {"out", "dx", "dgate_up_proj", "ddown_proj"} <= errors.keys()


# --- near misses ------------------------------------------------------------------------------------------------

def _experts(gating="swiglu", **overrides):
    g = torch.Generator().manual_seed(0)
    x, probs = torch.randn(7, 16, generator=g), torch.rand(7, 4, generator=g).softmax(-1)
    gate_up, down = torch.randn(4, 24, 16, generator=g) * 0.3, torch.randn(4, 16, 12, generator=g) * 0.3
    return x, probs, experts_arguments(x, gate_up, down, 2, gating=gating, limit=0.5, **overrides)


def _near_misses(fn, *args):
    _, report = compile_and_run(fn, *args, options={"codegen": "eager", "patterns": ["moe"]})
    assert "moe" not in report.counts(), report
    return [n.reason for n in report.near_misses if n.pattern == "moe"]


def _routed(example):
    """The example's experts as a function of (x, router probabilities)."""
    kwargs = {k: v for k, v in example.kwargs.items() if k not in ("x", "router_probs")}
    return lambda x, probs: example.search(x, probs, **kwargs)


def _routed_by(route, dtype=torch.float32):
    """The grouped_mm experts behind `route(probs) -> (weights, ids)`, their weights in `dtype`."""
    x, probs, arguments = _experts()
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in arguments.items()
              if k not in ("x", "gating", "stored_transposed")}
    kwargs.update(gate_up_proj=kwargs["gate_up_proj"].transpose(-2, -1), down_proj=kwargs["down_proj"].transpose(-2, -1))

    def block(x, probs):
        weights, ids = route(probs)
        return EXPERTS_SEARCHES["swiglu"](x, ids, weights, **kwargs)
    return block, x, probs


def test_ids_of_an_unrecognized_router_blame_the_router():
    """Before, any router but a top-k was blamed on "expert-parallel sentinels"; the reason names the op now."""
    block, x, probs = _routed_by(lambda p: (p.sort(-1, descending=True)[0][:, :2], p.argsort(-1)[:, :2]))
    (reason,) = _near_misses(block, x, probs)
    assert "the expert ids come from getitem" in reason and "not from a top-k, max or argmax" in reason, reason


def test_ids_written_after_the_router_are_a_near_miss():
    def route(p):
        weights, ids = torch.topk(p, 2, dim=-1)
        ids[0, 0] = 4  # an expert-parallel sentinel, as another rank would send
        return weights, ids
    block, x, probs = _routed_by(route)
    assert any("written in place" in r for r in _near_misses(block, x, probs))


def test_a_sparse_mixer_router_leaves_the_experts_fused():
    """PhiMoE's router (two maxes, concatenated): the experts are fused, the router stays."""
    def route(p):
        first = p.max(dim=-1, keepdim=True)[1]
        second = p.scatter(-1, first, float("-inf")).max(dim=-1, keepdim=True)[1]
        ids = torch.cat((first, second), dim=-1)
        return p.gather(-1, ids), ids
    block, x, probs = _routed_by(route)
    out, report = compile_and_run(block, x, probs, options={"codegen": "eager", "strict": True, "patterns": ["moe"]})
    assert report.counts() == {"moe": 1} and "sparse-mixer" in report.matches[0].mode, report
    assert_close(out, _routed_by(route, torch.float64)[0](x.double(), probs.double()), torch.float32)


def test_clamps_that_are_not_symmetric_are_a_near_miss():
    x, probs, arguments = _experts("clamped swiglu")
    arguments["lower"] = -0.25
    reasons = _near_misses(_routed(routed_example(probs, arguments)), x, probs)
    assert any("not [-limit, limit]" in r for r in reasons), reasons


def test_a_write_into_a_grouped_gemm_output_is_a_near_miss(monkeypatch):
    """Only the bias `add_` is modeled: another in-place op on a grouped GEMM's output is named, not fused."""
    x, probs, arguments = _experts()
    original = moe_pieces.grouped_linear.eager

    def doubled(a, weight, offs, bias, expert_ids):  # the gate/up GEMM's output doubled in place
        out = original(a, weight, offs, bias, expert_ids)
        if weight.shape[-1] == arguments["gate_up_proj"].shape[1]:
            out.mul_(2.0)
        return out
    monkeypatch.setattr(moe_pieces.grouped_linear, "eager", doubled)
    reasons = _near_misses(_routed(routed_example(probs, arguments)), x, probs)
    assert any("in place (mul_)" in r for r in reasons), reasons


def test_dense_experts_behind_other_scores_are_a_near_miss():
    """Llama-4's experts behind dense softmax scores run every expert on every token: not fused, and said why."""
    from fuser.patterns.moe import dense_experts
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(5, 16, generator=g), torch.randn(5, 4, generator=g)
    gate_up, down = torch.randn(4, 16, 24, generator=g) * 0.3, torch.randn(4, 12, 16, generator=g) * 0.3

    def block(x, logits):
        return dense_experts(x, logits.softmax(-1), gate_up, down, 4, 16, "silu")
    reasons = _near_misses(block, x, logits)
    assert any("not the sigmoid of top-k logits scattered into -inf" in r for r in reasons), reasons


# --- loop MoE under torch.compile --------------------------------------------------------------------------------

def test_loops_dynamo_breaks_are_left_to_convert():
    """transformers' eager experts loop (one-hot, then nonzero and a loop over its result) breaks Dynamo's graph:
    no `moe` rewrite under torch.compile; `fuser.convert` reports the same experts as fused (what explain says)."""
    model = tiny_model("olmoe", layers=1, intermediate_size=32, experts_implementation="eager")
    ids = tiny_inputs(model, length=5)
    assert "moe" not in fuser.explain(model, ids).counts()
    report = fuser.convert(copy.deepcopy(model), dry_run=True)
    assert report.counts().get("moe") == 1, report
