"""MoE kernels (`fuser::moe_route`, `fuser::moe_experts`) against float64 references.

On CPU the real Triton kernels run through the interpreter (conftest sets TRITON_INTERPRET=1).
Routing is checked as a set where scores tie (torch.topk's order among equal scores is its own);
the experts are checked on given ids, so ties there cannot change which expert a row meets.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

import fuser.kernels.moe as moe
from fuser.kernels.language import to_dtype
from fuser.numerics.contract import NEIGHBOURS, nudged
from numerics import TOLERANCE, assert_close, on_kernel_device, rel_l2

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tolerance(dtype):
    """The contract's tolerance, doubled for bf16: these tests compare with float64 alone, and a result of a
    few elements that sums cancelling terms can miss the tolerance in any code rounding to bf16 (fuzzing
    measures what the original attains there: fuser/fuzzing.py)."""
    return TOLERANCE[dtype] * (2 if dtype == torch.bfloat16 else 1)


def route_float64(logits, ids, scoring, renormalize, scaling):
    """The router's weights at the given ids, differentiable, in float64."""
    logits = logits.double()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scaling


def experts_float64(x, ids, weights, gate, up, down, biases=(None, None, None), gating=None, dtype=torch.float64):
    """The eager loop of transformers' experts, in float64 or `dtype` (ids outside [0, E) contribute nothing);
    `biases` (gate, up, down) and `gating` (alpha, limit: GPT-OSS's `_apply_gate`, written as it is) optional."""
    x, weights, gate, up, down = (t.to(dtype) for t in (x, weights, gate, up, down))
    gate_bias, up_bias, down_bias = (0.0 if b is None else b.to(dtype) for b in biases)
    out = torch.zeros_like(x)
    for expert in range(gate.shape[0]):
        token, slot = torch.where(ids == expert)
        g, u = (x[token] @ w[expert].T + (b if isinstance(b, float) else b[expert])
                for w, b in ((gate, gate_bias), (up, up_bias)))
        if gating is None:
            h = F.silu(g) * u
        else:
            alpha, limit = gating
            g, u = g.clamp(min=None, max=limit), u.clamp(min=-limit, max=limit)
            h = (u + 1) * (g * torch.sigmoid(g * alpha))
        y = h @ down[expert].T + (down_bias if isinstance(down_bias, float) else down_bias[expert])
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


# --- rounding ------------------------------------------------------------------------------------

@triton.jit
def _round_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, to_dtype(tl.load(src_ptr + offs, mask=offs < n), dst_ptr.dtype.element_ty), mask=offs < n)


def test_bf16_results_round_to_nearest_even_as_torch_does():
    """The kernels' fp32 -> bf16 rounding is torch's (and the GPU's) bit for bit, under the interpreter
    too (whose own conversion truncates): random bit patterns, ties both ways, subnormals, overflow, NaN."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bits = torch.randint(-2**31, 2**31, (1 << 16,), generator=torch.Generator().manual_seed(0))
    special = torch.tensor([0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1e-40, -3e-39, 3.4e38, float("inf"),
                            float("-inf"), float("nan")])
    x = torch.cat([bits.to(torch.int32).view(torch.float32), special]).to(device)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), 1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))


# --- routing -------------------------------------------------------------------------------------

@st.composite
def route_cases(draw):
    experts = draw(st.integers(1, 40))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    return dict(
        tokens=draw(st.integers(1, 40)), experts=experts, top_k=draw(st.integers(1, experts)), scoring=scoring,
        renormalize=draw(st.booleans()), bias=scoring == "sigmoid" and draw(st.booleans()),
        scaling=draw(st.sampled_from([1.0, 2.5])), dtype=draw(st.sampled_from(DTYPES)),
        out_fp32=draw(st.booleans()), tie_levels=draw(st.sampled_from([None, 1, 3])), seed=draw(st.integers(0, 2**16)))


@given(route_cases())
def test_route_picks_a_top_k_and_its_weights_and_gradient(case):
    torch.manual_seed(case["seed"])
    tokens, experts, top_k, dtype = case["tokens"], case["experts"], case["top_k"], case["dtype"]
    logits = torch.randn(tokens, experts)
    if case["tie_levels"]:  # many equal scores in every row
        logits = torch.randint(0, case["tie_levels"], (tokens, experts)).float()
    logits = logits.to(dtype).requires_grad_()
    bias = torch.randn(experts) if case["bias"] else None
    out_dtype = torch.float32 if case["out_fp32"] else dtype
    weights, ids = torch.ops.fuser.moe_route(logits, top_k, case["scoring"], case["renormalize"], bias,
                                             case["scaling"], out_dtype)
    assert weights.dtype == out_dtype and ids.dtype == torch.int64 and ids.shape == (tokens, top_k)

    scores = logits.detach().double()
    scores = scores.sigmoid() if case["scoring"] == "sigmoid" else scores.softmax(-1)
    choice = scores + (0 if bias is None else bias.double())
    picked = torch.zeros_like(choice, dtype=torch.bool).scatter_(1, ids, True)
    assert (picked.sum(1) == top_k).all(), "an expert chosen twice"
    if top_k < experts:  # a valid top-k: no unchosen expert scores above a chosen one
        worst_chosen = choice.masked_fill(~picked, float("inf")).min(1).values
        best_unchosen = choice.masked_fill(picked, float("-inf")).max(1).values
        assert (worst_chosen >= best_unchosen - 1e-6).all()
    assert (choice.gather(1, ids).diff(dim=1) <= 1e-6).all(), "not largest first"

    logits64 = logits.detach().double().requires_grad_()
    expected = route_float64(logits64, ids, case["scoring"], case["renormalize"], case["scaling"])
    assert_close(weights, expected, out_dtype, tolerance(out_dtype))
    grad = torch.randn(tokens, top_k, dtype=torch.float64)
    weights.backward(grad.to(out_dtype))
    expected.backward(grad)
    if top_k == 1 and case["renormalize"]:  # the weight is identically `scaling`: no gradient, only rounding
        assert logits.grad.abs().max() <= 1e-5 * case["scaling"] * grad.abs().max()
    else:
        coarser = max(dtype, out_dtype, key=TOLERANCE.get)
        assert_close(logits.grad, logits64.grad, coarser, tolerance(coarser))


# --- the routing plan ----------------------------------------------------------------------------

@given(tokens=st.integers(0, 60), experts=st.integers(1, 70), top_k=st.integers(1, 8),
       block_m=st.sampled_from([16, 32]), sentinel=st.booleans(), seed=st.integers(0, 2**16), fused=st.booleans())
def test_plan_sorts_rows_by_expert_stably(tokens, experts, top_k, block_m, sentinel, seed, fused):
    """In one launch (each program histograms all rows) and in two (per-chunk counts first)."""
    torch.manual_seed(seed)
    ids, = on_kernel_device(torch.randint(-int(sentinel), experts + int(sentinel), (tokens, top_k)))  # -1, experts:
    # dropped rows
    layout = moe.PlanLayout(tokens * top_k, experts, block_m)
    got = layout.split(moe.build_plan(ids, experts, block_m, fused=fused))
    want = layout.split(moe.build_plan_reference(ids, experts, block_m))
    routed = int(want[1][-1])
    assert torch.equal(got[0][:routed], want[0][:routed])
    for part, expected in zip(got[1:], want[1:]):
        assert torch.equal(part, expected)


# --- the experts ---------------------------------------------------------------------------------

@dataclass
class ExpertsCase:
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    dtype: torch.dtype
    weights_fp32: bool
    routing: str  # random | same_experts | few_experts | sentinel
    layout: str  # views | fused | separate | transposed | interleaved
    seed: int
    bias: bool = False
    clamped: bool = False  # GPT-OSS's clamped SwiGLU (alpha 1.702, limit drawn near the pre-activations' scale)


@st.composite
def experts_cases(draw):
    experts = draw(st.integers(1, 8))
    return ExpertsCase(
        tokens=draw(st.integers(1, 24)), hidden=draw(st.integers(1, 40)), intermediate=draw(st.integers(1, 40)),
        experts=experts, top_k=draw(st.integers(1, experts)), dtype=draw(st.sampled_from(DTYPES)),
        weights_fp32=draw(st.booleans()),
        routing=draw(st.sampled_from(["random", "same_experts", "few_experts", "sentinel"])),
        layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**16)), bias=draw(st.booleans()),
        clamped=draw(st.booleans()))


LAYOUTS = ("views", "fused", "separate", "transposed", "interleaved")
ALPHA, LIMIT = 1.702, 0.8  # GPT-OSS's alpha; a limit the unit-scale pre-activations cross often


def make_routing(case):
    """ids [T, K]: distinct experts per token, drawn from a pool that may leave experts without tokens."""
    pool = {"random": case.experts, "same_experts": case.top_k, "few_experts": max(case.top_k, case.experts // 2),
            "sentinel": case.experts}[case.routing]
    ids = torch.stack([torch.randperm(pool)[:case.top_k] for _ in range(case.tokens)])
    if case.routing == "same_experts":
        ids = ids[:1].expand(case.tokens, -1).contiguous()
    if case.routing == "sentinel":  # transformers' expert-parallel sentinel: id == E is dropped
        ids[0, 0] = case.experts
    return ids


def make_weights(case):
    """(leaves to differentiate, the op's expert tensors (gate, up, down, gate bias, up bias, down bias), their
    float64 counterparts' views (gate, up, down, gate bias, up bias, down bias)), biases None unless case.bias."""
    e, i, h, dtype = case.experts, case.intermediate, case.hidden, case.dtype

    def leaf(*shape, scale):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_()

    gate_up, down = leaf(e, 2 * i, h, scale=h ** -0.5), leaf(e, h, i, scale=i ** -0.5)
    gate_up_bias, down_bias = (leaf(e, 2 * i, scale=0.5), leaf(e, h, scale=0.5)) if case.bias else (None, None)
    if case.layout == "interleaved":  # GPT-OSS: [E, H, 2I] with gate and up columns alternating, down [E, I, H]
        gate_up = gate_up.detach().transpose(1, 2).contiguous().requires_grad_()
        down = down.detach().transpose(1, 2).contiguous().requires_grad_()
        weights = (gate_up[:, :, ::2].transpose(1, 2), gate_up[:, :, 1::2].transpose(1, 2), down.transpose(1, 2))
        biases = (gate_up_bias[:, ::2], gate_up_bias[:, 1::2], down_bias) if case.bias else (None,) * 3
        return [t for t in (gate_up, down, gate_up_bias, down_bias) if t is not None], weights + biases, \
            weights + biases
    split = (gate_up_bias[:, :i], gate_up_bias[:, i:], down_bias) if case.bias else (None,) * 3
    if case.layout in ("views", "fused"):
        leaves = [t for t in (gate_up, down, gate_up_bias, down_bias) if t is not None]
        if case.layout == "fused":
            return leaves, (gate_up, None, down, gate_up_bias, None, down_bias), \
                (gate_up[:, :i], gate_up[:, i:], down) + split
        return leaves, (gate_up[:, :i], gate_up[:, i:], down) + split, (gate_up[:, :i], gate_up[:, i:], down) + split
    copies = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (gate_up[:, :i], gate_up[:, i:], down) + split]
    if case.layout == "separate":
        return [t for t in copies if t is not None], tuple(copies), tuple(copies)
    # transposed: stored [E, H, I] and [E, I, H], read through transposed views
    stored = [t.detach().transpose(1, 2).clone(memory_format=torch.contiguous_format).requires_grad_()
              for t in copies[:3]]
    views = tuple(t.transpose(1, 2) for t in stored) + tuple(copies[3:])
    return stored + [t for t in copies[3:] if t is not None], views, views


@given(experts_cases())
def test_experts_values_and_gradients(case):
    check_experts(case)


def check_experts(case):
    torch.manual_seed(case.seed)
    x = torch.randn(case.tokens, case.hidden).to(case.dtype).requires_grad_()
    ids = make_routing(case)
    weights = torch.rand(case.tokens, case.top_k).to(torch.float32 if case.weights_fp32 else case.dtype)
    weights.requires_grad_()
    leaves, args, reference_weights = make_weights(case)
    gating = ("clamped_swiglu", ALPHA, LIMIT) if case.clamped else ()
    out = torch.ops.fuser.moe_experts(x, ids, weights, *args, *gating)
    assert out.dtype == case.dtype and out.shape == x.shape

    leaves64 = [t.detach().double().requires_grad_() for t in [x, weights, *leaves]]
    by_leaf = {id(t): t64 for t, t64 in zip([x, weights, *leaves], leaves64)}
    # rebuild the float64 weights through the same views, from the float64 leaves
    gate64, up64, down64, *biases64 = (None if w is None else _rebuild(w, by_leaf) for w in reference_weights)
    expected = experts_float64(leaves64[0], ids, leaves64[1], gate64, up64, down64, biases64,
                               (ALPHA, LIMIT) if case.clamped else None)
    assert_close(out, expected, case.dtype, tolerance(case.dtype))

    grad = torch.randn_like(expected)
    out.backward(grad.to(case.dtype))
    expected.backward(grad)
    floors = _clamped_floors(case, ids, grad, by_leaf, reference_weights, [x, weights, *leaves], leaves64)
    for leaf, leaf64, floor in zip([x, weights, *leaves], leaves64, floors):
        assert_close(leaf.grad, leaf64.grad, case.dtype, max(tolerance(case.dtype), floor))


def _clamped_floors(case, ids, grad, by_leaf, reference_weights, originals, leaves64):
    """Per leaf, the contract's floor for 16-bit clamped experts: a clamp's gradient is a step at the limit, and
    a pre-activation rounded to 16 bits falls on the other side of it, in the original as in the kernel (which
    saves the pre-activations in x's dtype), each at other elements. So, as `neighbour_floors`: over the inputs
    and NEIGHBOURS nudges of them by an ulp, the worst of twice the original loop's own error and of how far the
    exact gradient moves. Zero for other cases."""
    if not case.clamped or case.dtype == torch.float32:
        return [0.0] * len(leaves64)
    dtypes = [t.dtype for t in originals]

    def gradients(leaves, dtype):
        own = [t.detach().to(dtype).requires_grad_() for t in leaves]
        own_by_leaf = dict(zip(by_leaf, own))  # by_leaf's keys are in leaves64's order
        gate, up, down, *biases = (None if w is None else _rebuild(w, own_by_leaf) for w in reference_weights)
        experts_float64(own[0], ids, own[1], gate, up, down, biases, (ALPHA, LIMIT), dtype=dtype).backward(
            grad.to(dtype))
        return [t.grad for t in own]

    floors = [0.0] * len(leaves64)
    for seed in range(NEIGHBOURS + 1):
        named = {str(i): t.detach().to(d) for i, (t, d) in enumerate(zip(leaves64, dtypes))}
        near = list((nudged(named, (), seed - 1) if seed else named).values())
        exact, written = gradients(near, torch.float64), gradients(near, case.dtype)
        floors = [max(f, 2 * rel_l2(w, e), rel_l2(e, t.grad)) for f, w, e, t in zip(floors, written, exact, leaves64)]
    return floors


def _rebuild(view, by_leaf):
    """The float64 counterpart of a view of one of the leaves (same slicing / transposition)."""
    base = view if view._base is None else view._base
    base64 = by_leaf[id(base)]
    return base64.as_strided(view.shape, view.stride(), view.storage_offset())


def test_weight_gradient_partials_are_all_written(monkeypatch):
    """Autotuning runs configs of different BLOCK_N over one d(weight) partials buffer: each config must
    write every partial of its tile, or a narrower config's stale sums survive."""
    from fuser.kernels.moe import gemm
    config = gemm._ROWS_CONFIGS[0]
    grain = gemm.PARTIAL_GRAIN.value
    wide = triton.Config({**config.kwargs, "BLOCK_N": 2 * grain}, num_warps=config.num_warps,
                         num_stages=config.num_stages)
    monkeypatch.setattr(gemm._expert_rows_gemm_kernel, "configs", [wide])
    torch.manual_seed(0)
    tokens, hidden, intermediate, experts, top_k = 7, 20, 37, 3, 2
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    ids, weights, grad_out, act, down = on_kernel_device(
        ids, torch.rand(tokens, top_k), torch.randn(tokens, hidden), torch.randn(tokens * top_k, 2 * intermediate),
        torch.randn(experts, hidden, intermediate))
    layout = moe.PlanLayout(tokens * top_k, experts, 16)
    plan = moe.build_plan(ids, experts, 16)
    partials = torch.full((tokens * top_k, triton.cdiv(intermediate, grain)), float("nan"), device=act.device)
    gemm.expert_rows_gemm(gemm.GRAD_H, plan, layout, grad_out, down, down.stride(), torch.empty_like(act),
                          intermediate, hidden, top_k, act=act, routing_weights=weights.view(-1), partials=partials,
                          extra_output=True)
    gate, up = act.double().chunk(2, 1)  # act rows are in plan order
    h = F.silu(gate) * up
    expected = torch.empty(tokens * top_k, dtype=torch.float64, device=act.device)
    for position, row in enumerate(layout.split(plan)[0].tolist()):
        expected[row] = grad_out[row // top_k].double() @ down[ids.view(-1)[row]].double() @ h[position]
    assert_close(partials.sum(1), expected, torch.float32)


@pytest.mark.parametrize("wanted", ["x", "weights", "params", "x+weights"])
def test_experts_gradients_asked_for_alone(wanted):
    """The backward computes only what is asked for (dx and d(weight) share one launch, the weight and bias
    gradients another): each alone, with biases and a dropped (sentinel) row, against float64."""
    case = ExpertsCase(9, 20, 11, 5, 2, torch.float32, False, "sentinel", "fused", 3, bias=True)
    torch.manual_seed(case.seed)
    x = torch.randn(case.tokens, case.hidden).requires_grad_()
    ids = make_routing(case)
    weights = torch.rand(case.tokens, case.top_k).requires_grad_()
    leaves, args, reference_weights = make_weights(case)
    leaves64 = [t.detach().double().requires_grad_() for t in [x, weights, *leaves]]
    by_leaf = {id(t): t64 for t, t64 in zip([x, weights, *leaves], leaves64)}
    gate64, up64, down64, *biases64 = (_rebuild(w, by_leaf) if w is not None else None for w in reference_weights)
    expected = experts_float64(leaves64[0], ids, leaves64[1], gate64, up64, down64, biases64)
    chosen = {"x": [0], "weights": [1], "params": list(range(2, 2 + len(leaves))), "x+weights": [0, 1]}[wanted]
    grad = torch.randn_like(expected)
    out = torch.ops.fuser.moe_experts(x, ids, weights, *args)
    got = torch.autograd.grad(out, [[x, weights, *leaves][i] for i in chosen], grad.float())
    want = torch.autograd.grad(expected, [leaves64[i] for i in chosen], grad)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_experts_on_no_tokens_and_nan_rows():
    x = torch.randn(5, 12)
    x[2, 3] = float("nan")
    ids = torch.tensor([[0, 1]] * 5)
    weights = torch.rand(5, 2)
    gate_up, down = torch.randn(3, 2 * 7, 12), torch.randn(3, 12, 7)
    out = torch.ops.fuser.moe_experts(x, ids, weights, gate_up, None, down)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()
    assert_close(out, experts_float64(x, ids, weights, gate_up[:, :7], gate_up[:, 7:], down), torch.float32)
    empty = torch.ops.fuser.moe_experts(x[:0], ids[:0], weights[:0], gate_up, None, down)
    assert empty.shape == (0, 12)


def test_reference_path_without_interpreter(monkeypatch):
    """On a CPU without TRITON_INTERPRET the ops run their plain-torch references."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_experts(ExpertsCase(9, 20, 11, 5, 2, torch.bfloat16, False, "sentinel", "views", 0))
    check_experts(ExpertsCase(9, 20, 11, 5, 2, torch.float32, False, "sentinel", "interleaved", 0, True, True))
    for scoring, renormalize, experts, top_k in [("softmax", True, 6, 2), ("sigmoid", True, 6, 2),
                                                 ("softmax", False, 1, 1), ("sigmoid", False, 5, 5)]:
        logits = torch.randn(7, experts, requires_grad=True)
        weights, ids = torch.ops.fuser.moe_route(logits, top_k, scoring, renormalize, None, 2.5, torch.float32)
        reference_logits = logits.detach().double().requires_grad_()
        expected = route_float64(reference_logits, ids, scoring, renormalize, 2.5)
        assert_close(weights, expected, torch.float32)
        grad = torch.randn_like(weights)  # the op's body runs below autograd: its backward is closed-form
        assert_close(torch.autograd.grad(weights, logits, grad)[0],
                     torch.autograd.grad(expected, reference_logits, grad.double())[0], torch.float32)


# --- against transformers' own blocks ------------------------------------------------------------

def _hf_router_and_experts(family, hidden, intermediate, experts, top_k):
    """(router, experts, scoring, renormalize, bias, scaling, weights dtype rule) of a tiny transformers block."""
    if family == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts, OlmoeTopKRouter
        config = OlmoeConfig(hidden_size=hidden, intermediate_size=intermediate, num_experts=experts,
                             num_experts_per_tok=top_k, norm_topk_prob=False)
        config._experts_implementation = "eager"
        return OlmoeTopKRouter(config), OlmoeExperts(config), ("softmax", False, None, 1.0)
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
        config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                               num_experts_per_tok=top_k)
        config._experts_implementation = "eager"
        return MixtralTopKRouter(config), MixtralExperts(config), ("softmax", True, None, 1.0)
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3TopkRouter
    config = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=intermediate, n_routed_experts=experts,
                              num_experts_per_tok=top_k, n_group=1, topk_group=1, routed_scaling_factor=2.5)
    config._experts_implementation = "eager"
    router = DeepseekV3TopkRouter(config)
    return router, DeepseekV3Experts(config), ("sigmoid", True, router.e_score_correction_bias, 2.5)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
def test_matches_transformers_block(family):
    """Router + experts of a transformers 5.x block (float64) against moe_route + moe_experts (fp32)."""
    torch.manual_seed(0)
    tokens, hidden, intermediate, experts, top_k = 19, 24, 20, 6, 2
    router, hf_experts, (scoring, renormalize, bias, scaling) = _hf_router_and_experts(
        family, hidden, intermediate, experts, top_k)
    for parameter in [*router.parameters(), *hf_experts.parameters()]:
        torch.nn.init.normal_(parameter, std=hidden ** -0.5)
    if bias is not None:
        bias.normal_()
    router, hf_experts = router.double(), hf_experts.double()
    x64 = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    _, hf_weights, hf_ids = router(x64)
    expected = hf_experts(x64, hf_ids, hf_weights)

    params = [p.detach().float().requires_grad_() for p in (router.weight, hf_experts.gate_up_proj,
                                                            hf_experts.down_proj)]
    router_weight, gate_up, down = params
    x = x64.detach().float().requires_grad_()
    logits = F.linear(x, router_weight)
    weights, ids = torch.ops.fuser.moe_route(logits, top_k, scoring, renormalize,
                                             None if bias is None else bias.float(), scaling, torch.float32)
    assert torch.equal(ids.sort(1).values, hf_ids.sort(1).values)
    out = torch.ops.fuser.moe_experts(x, ids, weights, gate_up, None, down)
    assert_close(out, expected, torch.float32)

    grad = torch.randn_like(expected)
    out.backward(grad.float())
    expected.backward(grad)
    hf_params = (router.weight, hf_experts.gate_up_proj, hf_experts.down_proj)
    for ours, theirs in zip([x, *params], [x64, *hf_params]):
        assert_close(ours.grad, theirs.grad, torch.float32)


# --- torch.library and torch.compile -------------------------------------------------------------

def _sample(requires_grad):
    torch.manual_seed(0)
    x = torch.randn(9, 20, requires_grad=requires_grad)
    logits = torch.randn(9, 5, requires_grad=requires_grad)
    gate_up = torch.randn(5, 2 * 12, 20, requires_grad=requires_grad)
    down = torch.randn(5, 20, 12, requires_grad=requires_grad)
    return x, logits, gate_up, down


def test_opcheck():
    x, logits, gate_up, down = _sample(requires_grad=True)
    torch.library.opcheck(torch.ops.fuser.moe_route.default, (logits, 2, "softmax", True, None, 1.0, torch.float32))
    torch.library.opcheck(torch.ops.fuser.moe_route_forward.default,
                          (logits, 2, "softmax", True, None, 1.0, torch.float32))
    weights, ids = torch.ops.fuser.moe_route(logits.detach(), 2, "sigmoid", True, torch.randn(5), 2.5,
                                             torch.float32)
    weights.requires_grad_()
    torch.library.opcheck(torch.ops.fuser.moe_experts.default,
                          (x, ids, weights, gate_up[:, :12], gate_up[:, 12:], down))
    biases = (torch.randn(5, 24, requires_grad=True), None, torch.randn(5, 20, requires_grad=True))
    for experts in ((gate_up, None, down, None, None, None, "silu", 1.0, 0.0),
                    (gate_up, None, down, *biases, "clamped_swiglu", 1.702, 0.5)):
        torch.library.opcheck(torch.ops.fuser.moe_experts.default, (x, ids, weights, *experts))
        torch.library.opcheck(torch.ops.fuser.moe_experts_forward.default, (x, ids, weights, *experts, True))
        _, plan, act, h = torch.ops.fuser.moe_experts_forward(x, ids, weights, *experts, True)
        detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in experts)
        torch.library.opcheck(torch.ops.fuser.moe_experts_backward.default,
                              (torch.randn(9, 20), x.detach(), ids, weights.detach(), *detached, plan, act, h, True,
                               True, True))


def test_compiles_fullgraph_without_graph_breaks():
    x, logits, gate_up, down = _sample(requires_grad=True)

    def block(x, logits, gate_up, down):
        weights, ids = torch.ops.fuser.moe_route(logits, 2, "softmax", True, None, 1.0, x.dtype)
        return torch.ops.fuser.moe_experts(x, ids, weights, gate_up[:, :12], gate_up[:, 12:], down)

    eager = block(x, logits, gate_up, down)
    grad = torch.randn_like(eager)
    eager_grads = torch.autograd.grad(eager, (x, logits, gate_up, down), grad)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, logits, gate_up, down)
    compiled_grads = torch.autograd.grad(out, (x, logits, gate_up, down), grad)
    assert_close(out, eager, torch.float32)
    for ours, theirs in zip(compiled_grads, eager_grads):
        assert_close(ours, theirs, torch.float32)
    with torch.no_grad():
        assert_close(compiled(x, logits, gate_up, down), eager, torch.float32)


def test_small_weights_are_not_tuned():
    """Small expert weights (toy models, tests) run the first fitting candidate: tuning compiles each."""
    import triton

    from fuser.kernels.moe import gemm

    candidates = [triton.Config({"BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4)
                  for n in (128, 64, 256)]
    fit = dict(EPILOGUE=gemm.DOWN.value, BLOCK_M=128)
    assert len(gemm._accumulators_fit(candidates, dict(N=64, K=96), **fit)) == 1
    assert len(gemm._accumulators_fit(candidates, dict(N=2048, K=1024), **fit)) == 3
    assert len(gemm._weight_grad_candidates(candidates, dict(P=64, Q=96))) == 1
    assert len(gemm._weight_grad_candidates(candidates, dict(P=2048, Q=2048))) == 3
