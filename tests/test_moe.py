"""Mixture of experts, end to end: transformers' MoE models compiled with backend="fuser" (the `moe`
pattern on the grouped_mm experts path; `moe_router` only where it chooses the experts torch.topk
chooses), transformers' "fuser" experts implementation, and hand-written loop MoE blocks through
`match_moe_module`; values and gradients against float64, routing edge cases drawn by hypothesis."""
import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fuser
from fuser.integrations import transformers as fuser_transformers
from fuser.modules.moe_blocks import MoEBlock, match_moe_module
from fuser.modules.swap import FusedModule, install
from fuser.fuzzing import run_example
from fuser.models import tiny_inputs, tiny_model
import fuser.patterns.moe as moe_patterns
from fuser.patterns.moe import MOE, ROUTING_CASES, experts_arguments, routed_example
from fuser.patterns.moe_routers import MOE_ROUTER
from helpers import float64_reference, loss_step
from numerics import TOLERANCE, assert_close


@pytest.fixture(autouse=True, scope="module")
def _fuser_registered_with_transformers():
    """The "fuser" experts implementation, registered as anyone who asks for it by name does."""
    fuser_transformers.register()


# `moe` sites per tiny model (2 layers); DeepSeek-V3's first layer is dense (first_k_dense_replace=1)
EXPECTED_MOE = {"olmoe": 2, "mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "deepseek_v3": 1}
# softmax top-k routers, each a `moe_router` near miss at top-2 (DeepSeek-V3's group-limited sigmoid router is
# not matched at all: it stays as it is and feeds the fused experts)
SOFTMAX_ROUTERS = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")


# the MoE patterns alone: the rest of each model runs as it is (other kernels are other tests' business)
MOE_ONLY = {"codegen": "eager", "strict": True, "patterns": ["moe_router", "moe"]}


def _tiny_moe(arch, **overrides):
    """A tiny model whose experts are as small as Qwen's and DeepSeek's (intermediate 32): the kernels'
    backward runs through the Triton interpreter here, and its time grows with the expert weights."""
    return tiny_model(arch, **{"intermediate_size": 32, **overrides})


def _assert_step_matches_float64(model, ids, logits, grads):
    reference = float64_reference(model)
    ref_logits, ref_grads, _ = loss_step(reference, ids)
    assert_close(logits, ref_logits, torch.float32)
    assert any("experts" in name for name in grads) and grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, torch.float32)


@pytest.mark.parametrize("arch", EXPECTED_MOE)
def test_every_moe_layer_compiles_whole_and_matches_float64(arch):
    model = _tiny_moe(arch).train()
    ids = tiny_inputs(model)
    logits, grads, report = loss_step(model, ids, MOE_ONLY)
    assert report.counts() == {"moe": EXPECTED_MOE[arch]}, report
    routers = [n.reason for n in report.near_misses if n.pattern == "moe_router"]
    assert len(routers) == (2 if arch in SOFTMAX_ROUTERS else 0), report
    assert all(reason.startswith("not exact: on a tie") for reason in routers), routers
    _assert_step_matches_float64(model, ids, logits, grads)


@pytest.mark.parametrize("arch, overrides, mode", [
    # renormalized in place, weights in fp32: the router feeding the grouped_mm experts path
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=4), "softmax top-4 of 4 experts, renormalized"),
    # cast back, a shared expert beside
    ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=4, norm_topk_prob=True),
     "softmax top-4 of 4 experts, renormalized"),
    # the router feeding fuser::moe_experts itself
    ("olmoe", dict(num_experts=4, num_experts_per_tok=4, experts_implementation="fuser"),
     "softmax top-4 of 4 experts,"),
])
def test_the_router_is_fused_where_every_expert_is_chosen(arch, overrides, mode):
    model = _tiny_moe(arch, layers=1, **overrides).train()
    ids = tiny_inputs(model)
    logits, grads, report = loss_step(model, ids, MOE_ONLY)
    assert report.counts() == {"moe_router": 1}, report
    assert report.matches[0].mode.startswith(mode), report
    _assert_step_matches_float64(model, ids, logits, grads)


def test_route_and_topk_choose_other_experts_on_ties():
    """Why `moe_router` is refused below top-k = E: on tied scores the kernel picks the lowest expert
    indices and torch.topk by a rule of its own, so the same token goes to other experts. On CPU
    that rule even depends on the scores that do not tie (std::nth_element: routing_tie_problem)."""
    logits = torch.zeros(3, 8)
    kernel_device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: the interpreter (conftest)
    _, kernel_ids = torch.ops.fuser.moe_route(logits.to(kernel_device), 2, "softmax", True, None, 1.0, torch.float32)
    torch_ids = torch.topk(logits.softmax(-1), 2, dim=-1).indices
    assert kernel_ids.tolist() == [[0, 1]] * 3
    assert torch_ids.sort(-1).values.tolist() != kernel_ids.tolist()
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 0.0]])
    lower_last = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, -1.0]])
    assert torch.topk(scores, 2).indices.tolist() != torch.topk(lower_last, 2).indices.tolist()


# --- transformers' experts interface ------------------------------------------------------------

def test_transformers_accepts_the_fuser_experts_implementation():
    model = tiny_model("olmoe", layers=1, experts_implementation="fuser")
    assert model.config._experts_implementation == "fuser"
    assert model.get_correct_experts_implementation("fuser") == "fuser"
    with pytest.raises(ValueError, match='"fuser"'):  # listed among the valid ones
        model.get_correct_experts_implementation("no such experts")


def test_import_fuser_registers_nothing_and_register_registers_both_implementations():
    code = ("import sys, fuser; assert 'transformers' not in sys.modules; "
            "assert not any(type(f).__module__.startswith('fuser') for f in sys.meta_path), sys.meta_path; "
            "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS; "
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS; "
            "assert 'fuser' not in ALL_EXPERTS_FUNCTIONS and 'fuser' not in ALL_ATTENTION_FUNCTIONS; "
            "from fuser.integrations.transformers import fuser_attention, fuser_experts_forward, register; "
            "register(); "
            "assert ALL_EXPERTS_FUNCTIONS['fuser'] is fuser_experts_forward; "
            "assert ALL_ATTENTION_FUNCTIONS['fuser'] is fuser_attention")
    # outside the clone: `python -c` puts the working directory first on sys.path, where the clone's kernels/
    # would shadow the kernels package transformers 5.25 imports (fuser/source_tree.py)
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def _experts_calls(model, *args, **kwargs) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(*args, **kwargs)
    return sum(e.name == "fuser::moe_experts_forward" for e in profile.events())


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "deepseek_v3"])
def test_fuser_experts_implementation_matches_float64(arch):
    """Values and the calls of the op (its gradients are those checked through the `moe` pattern above)."""
    model = _tiny_moe(arch, experts_implementation="fuser")
    ids = tiny_inputs(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        assert _experts_calls(model, ids) == EXPECTED_MOE[arch]
        logits = model(ids).logits
        assert_close(logits, float64_reference(model)(ids).logits, torch.float32)
    assert not _fallback_warnings(caught)


def _olmoe_experts():
    return copy.deepcopy(tiny_model("olmoe", layers=1, experts_implementation="fuser").model.layers[0].mlp.experts)


def _with_bias(experts):
    experts.has_bias = True
    experts.gate_up_proj_bias = nn.Parameter(torch.randn(experts.gate_up_proj.shape[:2]))
    experts.down_proj_bias = nn.Parameter(torch.randn(experts.down_proj.shape[:2]))


def _not_gated(experts):
    experts.has_gate = False
    experts.up_proj = nn.Parameter(experts.gate_up_proj.detach()[:, : experts.down_proj.shape[2]].clone())


def _transposed(experts):
    experts.is_transposed = True
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())
    experts.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())


def _own_gate(experts):
    experts.__class__ = type("ClampedExperts", (type(experts),), {"_apply_gate": lambda self, x: x.chunk(2, -1)[1]})


COVERED = {"bias": _with_bias, "transposed": _transposed}  # layouts the kernel takes (GPT-OSS's: biased, transposed)

FALLBACKS = {  # what makes the kernel not apply: (change to the experts, the reason the warning gives)
    "not gated": (_not_gated, "its experts are not gated (an up projection only)"),
    "expert parallel": (lambda e: setattr(e, "_is_expert_parallel", True),
                        "it runs expert-parallel (ids of other ranks' experts are sentinels)"),
    "own gating": (_own_gate, "it has its own gating (`_apply_gate`)"),
    "gelu": (lambda e: setattr(e, "act_fn", nn.GELU()), "its activation is GELU, not SiLU"),
    "bf16 weights": (lambda e: e.to(torch.bfloat16), "hidden states in float32, expert weights in bfloat16 (the "
                     "kernel takes one of float16, bfloat16, float32 for both)"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_experts_the_kernel_does_not_cover_run_grouped_mm_with_one_warning(case, monkeypatch):
    from transformers.integrations.moe import grouped_mm_experts_forward

    monkeypatch.setattr(fuser_transformers, "_warned", set())
    change, reason = FALLBACKS[case]
    experts = _olmoe_experts()
    change(experts)
    generator = torch.Generator().manual_seed(0)
    x, weights = torch.randn(7, 64, generator=generator), torch.rand(7, 2, generator=generator)
    ids = torch.randint(0, 8, (7, 2), generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [experts(x, ids, weights) for _ in range(2)]
    assert [str(w.message) for w in _fallback_warnings(caught)] == [
        f"fuser experts: {type(experts).__name__} runs transformers' grouped_mm experts: {reason}"]
    assert all(torch.equal(out, grouped_mm_experts_forward(experts, x, ids, weights)) for out in outs)


@pytest.mark.parametrize("case", COVERED)
def test_biased_and_transposed_experts_run_the_kernel(case, monkeypatch):
    """Experts with biases or stored transposed run fuser::moe_experts, without a warning, as transformers'
    batched_mm experts do (its grouped_mm takes no float64 on a CPU)."""
    from transformers.integrations.moe import batched_mm_experts_forward

    monkeypatch.setattr(fuser_transformers, "_warned", set())
    experts = _olmoe_experts()
    COVERED[case](experts)
    generator = torch.Generator().manual_seed(0)
    x, weights = torch.randn(7, 64, generator=generator), torch.rand(7, 2, generator=generator)
    ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(7)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _experts_calls(experts, x, ids, weights) == 1
        out = experts(x, ids, weights)
    assert not _fallback_warnings(caught)
    assert_close(out, batched_mm_experts_forward(copy.deepcopy(experts).double(), x.double(), ids, weights.double()),
                 torch.float32)


def _fallback_warnings(caught):
    return [w for w in caught if str(w.message).startswith("fuser experts:")]


# --- the `moe` and `moe_router` patterns under hypothesis ----------------------------------------

def _edge_case_holds(routing: str, example) -> bool:
    """The drawn example is the edge case it is named for."""
    probs, top_k = example.kwargs["router_probs"], example.kwargs["top_k"]
    ids = torch.topk(probs, top_k, dim=-1).indices
    return {"random scores": True, "tied scores": probs.shape[1] == 1 or bool((probs[0] == probs[0, 0]).all()),
            "experts left without tokens": ids.unique().numel() < probs.shape[1],
            "every token to one expert": ids.unique().numel() == 1,
            "top-k = number of experts": top_k == probs.shape[1], "one token": probs.shape[0] == 1}[routing]


@pytest.mark.parametrize("routing", ROUTING_CASES)
@settings(max_examples=max(2, settings.default.max_examples // len(ROUTING_CASES)))
@given(data=st.data())
def test_moe_pattern_on_routing_edge_cases(routing, data):
    example = data.draw(MOE.searches[0].examples(routing), label="example")
    assert _edge_case_holds(routing, example), example
    errors = run_example(MOE, example)
    assert {"out", "dx", "dgate_up_proj", "ddown_proj"} <= errors.keys()


@settings(max_examples=max(3, settings.default.max_examples // 4))
@given(example=MOE_ROUTER.examples())
def test_moe_router_pattern_values_and_gradients(example):
    errors = run_example(MOE_ROUTER, example)
    assert "drouter_logits" in errors


def _cancelling_one_element_dx():
    """One token of hidden size 1 sent to two experts whose terms of dX nearly cancel."""
    bf16 = torch.bfloat16
    return routed_example(torch.tensor([[0.53125, 0.466796875]], dtype=bf16), experts_arguments(
        torch.tensor([[-0.279296875]], dtype=bf16),
        torch.tensor([[[0.1279296875], [0.11962890625]], [[0.2099609375], [0.09716796875]]], dtype=bf16),
        torch.tensor([[[-0.09228515625]], [[0.09521484375]]], dtype=bf16), top_k=2))


def _original_dx_error(example) -> float:
    """The relative error of the original code's own dX (in its dtype) against float64, as fuzzing measures it."""
    grads = []
    for dtype in (example.kwargs["x"].dtype, torch.float64):
        kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in example.kwargs.items()}
        x = kwargs["x"].requires_grad_()
        out = example.search(**kwargs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grads.append(torch.autograd.grad(out, x, grad_out.to(dtype))[0].double())
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def test_a_one_element_bf16_gradient_is_held_to_what_bf16_attains():
    """Such a dX is one bf16 number: a few percent off in any code that rounds its intermediates,
    while the original may be exact by luck. Here the kernel misses both the tolerance and twice
    the original's error on these inputs, and meets the original's error an ulp away."""
    example = _cancelling_one_element_dx()
    errors = run_example(MOE, example)
    assert errors["dx"].error > max(TOLERANCE[torch.bfloat16], 2 * _original_dx_error(example))


def test_the_contract_still_fails_a_rewrite_a_few_percent_off(monkeypatch):
    """The floor rises only where the original's precision cannot do better: on inputs that are not
    ill-conditioned, a rewrite 3% off fails."""
    g, bf16 = torch.Generator().manual_seed(0), torch.bfloat16
    example = routed_example(torch.rand(5, 4, generator=g).softmax(-1).to(bf16), experts_arguments(
        torch.randn(5, 16, generator=g).to(bf16), (torch.randn(4, 24, 16, generator=g) * 0.3).to(bf16),
        (torch.randn(4, 16, 12, generator=g) * 0.3).to(bf16), top_k=2))
    run_example(MOE, example)
    fused = moe_patterns.fused_experts
    monkeypatch.setattr(moe_patterns, "fused_experts", lambda *args: fused(*args) * 1.03)
    with pytest.raises(AssertionError, match="output: relative L2 error"):
        run_example(MOE, example)


# --- near misses in models ------------------------------------------------------------------------

@pytest.mark.parametrize("change, reason", [
    (dict(hidden_act="gelu"), "the experts' activation is gelu, not SiLU"),
    ("bf16 experts", "expert weights in bfloat16, activations in float32"),
])
def test_moe_near_misses_in_models(change, reason):
    model = tiny_model("olmoe", **(change if isinstance(change, dict) else {}))
    if change == "bf16 experts":
        for layer in model.model.layers:
            layer.mlp.experts.to(torch.bfloat16)
    report = fuser.explain(model, tiny_inputs(model))
    assert "moe" not in report.counts() and "moe_router" not in report.counts(), report
    reasons = [n.reason for n in report.near_misses if n.pattern == "moe"]
    assert len(reasons) == 2 and all(reason in r for r in reasons), report


# --- hand-written loop MoE blocks -----------------------------------------------------------------

class SwiGLUExpert(nn.Module):
    """Mixtral's expert as transformers 4.x wrote it: w2(act(w1 x) · w3 x)."""

    def __init__(self, hidden, intermediate, act=F.silu):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """A sparse MoE block as transformers 4.x's Mixtral and most research code write it: a router
    nn.Linear, a ModuleList of SwiGLU experts, a Python loop over the experts."""

    def __init__(self, hidden=32, intermediate=24, num_experts=6, top_k=2, renormalize=True, router_logits=True,
                 act=F.silu):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, intermediate, act) for _ in range(num_experts))
        self.top_k, self.renormalize, self.router_logits = top_k, renormalize, router_logits

    def route(self, router_logits):
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights, selected

    def forward(self, hidden_states):
        batch, length, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        router_logits = self.gate(x)
        weights, selected = self.route(router_logits)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for i, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[i])
            out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(x.dtype))
        out = out.view(batch, length, hidden)
        return (out, router_logits) if self.router_logits else out


class LoopMoEModel(nn.Module):
    """Two loop MoE blocks with residuals."""

    def __init__(self, **block):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(LoopMoE(**block) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


def _convert_blocks(model) -> list[str]:
    """match_moe_module on each block, the fused copy put in its place; what each runs."""
    notes = []
    for i, block in enumerate(model.blocks):
        fused, note = match_moe_module(block)
        assert fused is not None, note
        model.blocks[i] = fused
        notes.append(note)
    return notes


@pytest.mark.parametrize("block, mode", [
    (dict(), "6 experts, top-2, renormalized, SwiGLU, float32, routed by torch.topk"),
    (dict(top_k=1, renormalize=False, router_logits=False), "6 experts, top-1, SwiGLU, float32, routed by torch.topk"),
    # every expert chosen: renormalizing changes nothing, the kernel routes
    (dict(num_experts=4, top_k=4), "4 experts, top-4, SwiGLU, float32, routed by fuser::moe_route"),
])
def test_loop_moe_blocks_are_fused_with_their_own_weights(block, mode):
    model = LoopMoEModel(**block)
    reference = copy.deepcopy(model).double()
    weights = dict(model.state_dict())
    assert _convert_blocks(model) == [mode, mode]
    assert all(isinstance(b, FusedModule) and isinstance(b.fuser_call, MoEBlock) and isinstance(b, LoopMoE)
               for b in model.blocks)
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(state[k].data_ptr() == weights[k].data_ptr() and torch.equal(state[k], weights[k]) for k in state)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, ref = model(x), reference(x64)
    assert_close(out, ref, torch.float32)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert_close(x.grad, x64.grad, torch.float32)
    for p, p64 in zip(model.parameters(), reference.parameters()):
        assert_close(p.grad, p64.grad, torch.float32)


def test_stacked_expert_weights_are_kept_until_a_weight_changes():
    block = LoopMoE()
    install(block, match_moe_module(block)[0].fuser_call)
    assert isinstance(block, FusedModule) and isinstance(block.fuser_call, MoEBlock)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        block(x)
        stacked = block._fuser_stacked[1]
        block(x)
        assert block._fuser_stacked[1] is stacked
        block.experts[3].w1.weight.mul_(2)  # as an optimizer step would
        out = block(x)[0]
    assert block._fuser_stacked[1] is not stacked
    reference = copy.deepcopy(block).double()
    reference.__class__ = LoopMoE
    assert_close(out, reference(x.double())[0], torch.float32)
    for restored in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert type(restored) is type(block) and "_fuser_stacked" not in vars(restored)
        assert_close(restored(x)[0], out, torch.float32)


NOT_CANONICAL = {  # a block that is not the canonical top-k MoE: (block, what the reason says)
    "gelu experts": (lambda: LoopMoE(act=F.gelu), "down(gelu(gate(x)) · up(x))"),
    "a shared expert": (lambda: _with_shared_expert(LoopMoE()), "parameters besides its router and experts"),
    "sigmoid routing": (lambda: _routed_by(LoopMoE(), lambda logits, k: torch.topk(logits.sigmoid(), k, dim=-1)),
                        "no softmax top-k mixture"),
    "routing weights detached": (lambda: _routed_by(LoopMoE(renormalize=False), lambda logits, k: tuple(
        t.detach() for t in torch.topk(logits.float().softmax(-1), k, dim=-1))), "the gradient of the input is not"),
    "one odd expert": (lambda: _with_odd_expert(LoopMoE()), "expert 5 is not the SwiGLU expert 0 is"),
    "experts in another dtype": (lambda: _with_bf16_experts(LoopMoE()), "its parameters are in bfloat16 and float32"),
}


def _with_shared_expert(block):
    block.shared = SwiGLUExpert(32, 8)
    return block


def _routed_by(block, route):
    block.route = lambda logits: route(logits, block.top_k)
    return block


def _with_odd_expert(block):
    block.experts[5].act = F.relu
    return block


def _with_bf16_experts(block):
    block.experts.to(torch.bfloat16)
    return block


@pytest.mark.parametrize("case", NOT_CANONICAL)
def test_loop_blocks_that_are_not_the_canonical_moe_are_left_alone(case):
    make, reason = NOT_CANONICAL[case]
    block = make()
    fused, why = match_moe_module(block)
    assert fused is None and reason in why, why
    assert type(block) is LoopMoE
