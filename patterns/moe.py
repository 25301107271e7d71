"""Mixture of experts → `fuser::moe_experts` (token sort, grouped GEMMs with SwiGLU and the routing
weight in their epilogues, combine over top-k: one op, no host sync), and the router in front →
`fuser::moe_route` where that is exact.

`moe`: transformers 5.x's `grouped_mm` experts path (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V3
and every model on the experts interface), as `torch.compile` traces it: sort the (token, k)
pairs by expert, gather, histogram → offsets, grouped GEMM gate/up, SiLU·mul, grouped GEMM down,
routing weight, inverse permutation, sum over top-k. The router in front (and shared experts
beside) stay as they are and feed the op. Another activation than SiLU, or expert weights in
another dtype than the hidden states, make a near miss.

`moe_router`: the softmax top-k router of OLMoE, Mixtral and Qwen2/3-MoE (softmax over the experts,
in fp32 or not → top-k → optional renormalization → cast) with the experts it feeds (the grouped_mm
path, or `fuser::moe_experts` itself under transformers' "fuser" experts implementation) →
`fuser::moe_route` + `fuser::moe_experts`. Its match holds the experts too, so it runs before
`moe`. It is exact only where every expert is chosen (top-k = number of experts): the kernel
breaks ties in the scores by lowest expert index and torch.topk by its own order, so below that a
tie at the k-th place would send a token to another expert (`routing_tie_problem`). There the
router is a near miss with that reason and `moe` fuses the experts alone. DeepSeek-V3's
group-limited sigmoid router is not matched: it stays as it is and feeds the fused experts.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from torch import fx

from fuser.kernels.moe import LIMITS
from fuser.kernels.moe.route import routing_tie_problem
from fuser.patterns.base import UNCHECKED, Example, Pattern, Search, cast, dtype_name, structural
from fuser.patterns.nodes import tensor_meta
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


def _sentinel_masked_shapes(node):
    """transformers ≤ 5.17 zeroes expert-parallel sentinel rows after each grouped GEMM:
    `out.masked_fill((expert_ids_g >= E).unsqueeze(-1), 0.0)`; later versions only do so
    under expert parallelism. Either way, ids come from a top-k over E experts (see check)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "masked_fill" \
            and len(node.args) == 3 and node.args[2] == 0:
        sentinel = node.args[1]
        if isinstance(sentinel, fx.Node) and sentinel.target == "unsqueeze" and sentinel.args[1:] == (-1,):
            above = sentinel.args[0]
            if isinstance(above, fx.Node) and getattr(above.target, "__name__", above.target) == "ge":
                yield node.args[0], (above.args[0], above.args[1]), (node, sentinel, above)
    yield node, (UNCHECKED, UNCHECKED), ()


@structural(_sentinel_masked_shapes)
def sentinel_masked(x, expert_ids, num_experts):
    return x.masked_fill((expert_ids >= num_experts).unsqueeze(-1), 0.0)


_GROUPED_MM_NAMES = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def _grouped_mm_shapes(node):
    """A grouped GEMM in any spelling: `torch._grouped_mm`, `F.grouped_mm`, transformers' fallback op."""
    if isinstance(node, fx.Node) and node.op == "call_function" and len(node.args) == 2 \
            and getattr(node.target, "__name__", None) in _GROUPED_MM_NAMES and "offs" in node.kwargs \
            and all(node.kwargs.get(k) is None for k in ("bias", "out_dtype")):
        yield node.args[0], (node.args[1], node.kwargs["offs"]), (node,)


@structural(_grouped_mm_shapes)
def grouped_mm(x, weight, offs):
    """Rows [offs[g-1], offs[g]) of x times weight[g]; run eagerly through transformers' op, which
    takes every dtype (the native kernel takes bf16 only). `experts_arguments` registers the op:
    an import inside code Dynamo traces fails where nothing imported it before."""
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offs=offs)


def _function_name(node) -> str:
    """`silu`, `gelu(approximate='tanh')`: a call's function and its literal arguments."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    literals = [repr(a) for a in node.args[1:]] + [f"{k}={v!r}" for k, v in node.kwargs.items()]
    return f"{name}({', '.join(literals)})" if literals else name


def _activation_shapes(node):
    """Any function of the gate projection alone (its literal arguments aside): SiLU or another
    activation, named so that check can say which."""
    if isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.args \
            and isinstance(node.args[0], fx.Node) \
            and not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        yield node.args[0], (_function_name(node),), (node,)


@structural(_activation_shapes)
def gate_activation(gate, name):
    """The activation of the gate projection; the kernel fuses SiLU (`name` "silu") only."""
    return {"silu": F.silu}[name](gate)


def grouped_mm_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, top_k, num_experts, max_expert,
                       histc_dtype, matmul_dtype, down_matmul_dtype, tokens, hidden, out_dtype, activation):
    """transformers.integrations.moe.grouped_mm_experts_forward (gated experts, no bias). Each grouped
    GEMM casts its input to the weights' dtype: the first where the hidden states are in another
    dtype, the second hardly ever (the gate/up output is in the weights' dtype already)."""
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    ordered = torch.sort(expert_ids)
    expert_ids_g, perm = ordered[0], ordered[1]
    selected = x[perm // top_k]
    sample_weights_g = sample_weights[perm]
    tokens_per_expert = torch.histc(cast(expert_ids_g, histc_dtype), bins=num_experts, min=0, max=max_expert)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    gate_up = sentinel_masked(grouped_mm(cast(selected, matmul_dtype), gate_up_proj.transpose(-2, -1), offsets),
                              expert_ids_g, num_experts)
    halves = gate_up.chunk(2, dim=-1)
    hidden_g = gate_activation(halves[0], activation) * halves[1]
    down = sentinel_masked(grouped_mm(cast(hidden_g, down_matmul_dtype), down_proj.transpose(-2, -1), offsets),
                           expert_ids_g, num_experts)
    weighted = down * sample_weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    # `inverse[perm] = arange(S)`, spelled so fx can trace it; in-place writes into a tensor the
    # match creates join the match (the walk from the output does not meet them)
    inverse.__setitem__(perm, torch.arange(perm.numel(), device=perm.device))
    return cast(weighted[inverse].view(tokens, top_k, hidden).sum(dim=1), out_dtype)



def _ids_from_top_k(node, experts: int) -> bool:
    """The kernel takes ids in [0, E): true of `topk(scores [T, E], k)[1]` (through views and casts)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "view", "reshape", "long"):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is operator.getitem and node.args[1] == 1):
        return False
    top_k = node.args[0]
    scores = top_k.args[0] if isinstance(top_k, fx.Node) and top_k.target in (torch.topk, "topk") else None
    meta = tensor_meta(scores)
    dim = top_k.kwargs.get("dim", top_k.args[2] if len(top_k.args) > 2 else -1) if scores is not None else None
    return isinstance(meta, torch.Tensor) and dim in (-1, meta.dim() - 1) and meta.shape[-1] == experts


def _experts_problem(m) -> str | None:
    """What the kernel does not take in the experts themselves: their activation, weights and sizes."""
    x, gate_up, down = m.meta("x"), m.meta("gate_up_proj"), m.meta("down_proj")
    if not all(isinstance(t, torch.Tensor) for t in (x, gate_up, down)):
        return "the experts' inputs are not all tensors"
    if m["activation"] != "silu":
        return (f"the experts' activation is {m['activation']}, not SiLU: the kernel fuses SwiGLU (silu(gate) · up) "
                "only")
    if x.dim() != 2 or x.dtype not in LIMITS.dtypes:
        return f"hidden states {tuple(x.shape)} in {dtype_name(x.dtype)} are not [T, H] in float16/bfloat16/float32"
    experts, two_i, hidden = gate_up.shape if gate_up.dim() == 3 else (None, None, None)
    if experts is None or two_i % 2 or down.dim() != 3 or tuple(down.shape) != (experts, hidden, two_i // 2):
        return f"expert weights {tuple(gate_up.shape)} / {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    if hidden != x.shape[1] or m["num_experts"] != experts or m["max_expert"] != experts - 1:
        return "the histogram or hidden size disagree with the expert weights"
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        return f"expert weights in {dtype_name(gate_up.dtype)}, activations in {dtype_name(x.dtype)}"
    return None


def check(m) -> str | None:
    x, ids, weights = m.meta("x"), m.meta("top_k_index"), m.meta("top_k_weights")
    if not all(isinstance(t, torch.Tensor) for t in (x, ids, weights)):
        return "the experts' inputs are not all tensors"
    if ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != x.shape[0] or m["top_k"] != ids.shape[1]:
        return f"hidden states {tuple(x.shape)} and top-k {tuple(ids.shape)} are not [T, H] and [T, K]"
    if ids.dtype not in (torch.int64, torch.int32):
        return f"expert ids in {dtype_name(ids.dtype)}, not int32/int64"
    problem = _experts_problem(m)
    if problem is None and not _ids_from_top_k(m.bindings["top_k_index"], m.meta("gate_up_proj").shape[0]):
        return "expert ids do not come from a top-k over the experts (expert-parallel sentinels may be among them)"
    return problem


def _fused_experts(m, ids, weights):
    """`fuser::moe_experts` in place of the grouped_mm experts path of `m` (weights in the activations' dtype)."""
    out = torch.ops.fuser.moe_experts(m["x"], ids, weights.to(m.meta("x").dtype), m["gate_up_proj"], None,
                                      m["down_proj"])
    return out.to(tensor_meta(m.output).dtype)


def replace(m):
    return _fused_experts(m, m["top_k_index"], m["top_k_weights"])


def describe(m) -> str:
    experts, two_i, hidden = m.meta("gate_up_proj").shape
    return (f"{experts} experts, top-{m['top_k']}, hidden {hidden}, intermediate {two_i // 2}, SwiGLU, "
            f"{dtype_name(m.meta('x').dtype)}")


ROUTING_CASES = ("random scores", "tied scores", "experts left without tokens", "every token to one expert",
                 "top-k = number of experts", "one token")


def _router_scores(routing: str, tokens: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    if routing == "tied scores":  # two values only, the first token's all equal: ties at the k-th place
        scores = torch.randint(0, 2, (tokens, experts), generator=generator).float()
        scores[0] = 0
        return scores
    if routing in ("experts left without tokens", "every token to one expert"):  # one ranking for every token
        return torch.arange(experts, dtype=torch.float32).expand(tokens, experts).clone()
    return torch.rand(tokens, experts, generator=generator)


def experts_arguments(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, top_k: int) -> dict:
    """The grouped_mm experts' arguments besides the routing, as transformers passes them."""
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

    experts = gate_up_proj.shape[0]
    return dict(x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, top_k=top_k, num_experts=experts,
                max_expert=experts - 1, histc_dtype=torch.float32, matmul_dtype=None, down_matmul_dtype=None,
                tokens=x.shape[0], hidden=x.shape[1], out_dtype=None, activation="silu")


def _experts_arguments(draw, dtype: torch.dtype, tokens: int, experts: int, top_k: int) -> dict:
    """Hidden states and expert weights of any size from 1 and any layout."""
    hidden, intermediate = draw(sizes(40)), draw(sizes(40))
    return experts_arguments(draw(tensors((tokens, hidden), dtype)),
                             draw(tensors((experts, 2 * intermediate, hidden), dtype, scale=0.3)),
                             draw(tensors((experts, hidden, intermediate), dtype, scale=0.3)), top_k)


@st.composite
def _examples(draw, routing: str | None = None) -> Example:
    """The experts behind a top-k router; `routing` (one of ROUTING_CASES, drawn when None) picks the edge case."""
    routing = routing or draw(st.sampled_from(ROUTING_CASES))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    tokens = 1 if routing == "one token" else draw(sizes(24))
    starved = routing in ("experts left without tokens", "every token to one expert")
    experts = draw(st.integers(2 if starved else 1, 6))
    if routing == "every token to one expert":
        top_k = 1
    elif routing == "top-k = number of experts":
        top_k = experts
    else:  # experts left without tokens need k < E
        top_k = draw(st.integers(1, experts - 1 if starved else experts))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = _router_scores(routing, tokens, experts, generator)
    return routed_example(scores.softmax(-1).to(dtype), _experts_arguments(draw, dtype, tokens, experts, top_k))


def routed_example(router_probs: torch.Tensor, experts: dict) -> Example:
    """`routed_experts` on these router probabilities and `experts_arguments`."""
    return Example(routed_experts, dict(router_probs=router_probs, **experts), constants=("router_probs",))


def routed_experts(x, router_probs, top_k, **experts_arguments):
    """The experts behind a top-k router, as models have them (the ids then provably name experts)."""
    weights, ids = torch.topk(router_probs, top_k, dim=-1)
    return grouped_mm_experts(x, ids, weights, top_k=top_k, **experts_arguments)


MOE = Pattern("moe", (Search(grouped_mm_experts, _examples),), check, replace, describe, anchors=(torch.sort,))


# ---------------------------------------------------------------------------------------------
# The router in front: softmax → top-k → renormalization → fuser::moe_route
# ---------------------------------------------------------------------------------------------

def _sum_over_last_dim(node, source) -> bool:
    """`source.sum(dim=-1, keepdim=True)` in any spelling."""
    if not (isinstance(node, fx.Node) and node.target in ("sum", torch.sum) and node.args[:1] == (source,)):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    meta = tensor_meta(source)
    last = (-1, meta.dim() - 1) if isinstance(meta, torch.Tensor) else (-1,)
    return keepdim is True and (dim in last or isinstance(dim, (tuple, list)) and len(dim) == 1 and dim[0] in last)


def _renormalized_shapes(node):
    """`w / w.sum(-1, keepdim=True)`, in place (`w /= ...`, as transformers' routers write it) or
    not; or no renormalization."""
    if isinstance(node, fx.Node) and node.op == "call_function" \
            and node.target in (operator.truediv, operator.itruediv) and len(node.args) == 2 \
            and _sum_over_last_dim(node.args[1], node.args[0]):
        yield node.args[0], (True,), (node.args[1], node)
    yield node, (False,), ()


@structural(_renormalized_shapes)
def renormalized(weights, renormalize):
    """Top-k weights divided by their sum when `renormalize`."""
    return weights / weights.sum(-1, keepdim=True) if renormalize else weights


def _softmax_top_k(router_logits, compute_dtype, top_k):
    """The routers of OLMoE, Mixtral and Qwen2/3-MoE: softmax over the experts (fp32 or not), top-k."""
    return torch.topk(torch.softmax(cast(router_logits, compute_dtype), -1), top_k, dim=-1)


def routed_grouped_mm_experts(router_logits, compute_dtype, top_k, renormalize, weights_dtype, x, gate_up_proj,
                              down_proj, num_experts, max_expert, histc_dtype, matmul_dtype, down_matmul_dtype, tokens,
                              hidden, out_dtype, activation):
    """The router feeding transformers' grouped_mm experts path (the match then holds both, so it
    runs before `moe`, which takes the experts alone where the router stays)."""
    top = _softmax_top_k(router_logits, compute_dtype, top_k)
    weights = cast(renormalized(top[0], renormalize), weights_dtype)
    return grouped_mm_experts(x, top[1], weights, gate_up_proj, down_proj, top_k, num_experts, max_expert,
                              histc_dtype, matmul_dtype, down_matmul_dtype, tokens, hidden, out_dtype, activation)


def routed_fused_experts(router_logits, compute_dtype, top_k, renormalize, weights_dtype, x, gate_proj, up_proj,
                         down_proj):
    """The router feeding `fuser::moe_experts` itself (the "fuser" experts implementation of transformers)."""
    top = _softmax_top_k(router_logits, compute_dtype, top_k)
    weights = cast(renormalized(top[0], renormalize), weights_dtype)
    return torch.ops.fuser.moe_experts(x, top[1], weights, gate_proj, up_proj, down_proj)


@dataclass(frozen=True)
class RoutedExperts:
    """The experts a matched router feeds, as that spelling holds them (`Search.read`)."""
    problem: Any                 # match -> what the kernel does not take in these experts, or None
    weights_dtype: torch.dtype   # the dtype the experts take their routing weights in
    fused: Any                   # (match, ids, weights) -> the experts' output through fuser::moe_experts


def _read_grouped_mm(m) -> RoutedExperts:
    return RoutedExperts(_experts_problem, m.meta("x").dtype, _fused_experts)


def _read_fused(m) -> RoutedExperts:
    def fused(m, ids, weights):
        return torch.ops.fuser.moe_experts(m["x"], ids, weights, m["gate_proj"], m["up_proj"], m["down_proj"])
    return RoutedExperts(lambda m: None, tensor_meta(m.output.args[2]).dtype, fused)


def check_router(m) -> str | None:
    logits, x = m.meta("router_logits"), m.meta("x")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in LIMITS.dtypes:
        return f"router logits are not a [tokens, experts] float16/bfloat16/float32 tensor ({logits})"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != logits.shape[0]:
        return "the router and the experts see different tokens"
    if m["compute_dtype"] not in (None, torch.float32):
        return f"the softmax computes in {dtype_name(m['compute_dtype'])}; the kernel computes in float32"
    return routing_tie_problem(m["top_k"], logits.shape[1]) or m.site.problem(m)


def _route(m, weights_dtype: torch.dtype):
    """(weights, ids) of `fuser::moe_route` for the router of `m`."""
    route = torch.ops.fuser.moe_route(m["router_logits"], m["top_k"], "softmax", m["renormalize"], None, 1.0,
                                      weights_dtype)
    return route[0], route[1]


def replace_router(m):
    weights, ids = _route(m, m.site.weights_dtype)
    return m.site.fused(m, ids, weights)


def describe_router(m) -> str:
    return (f"softmax top-{m['top_k']} of {m.meta('router_logits').shape[1]} experts"
            f"{', renormalized' if m['renormalize'] else ''}, weights in {dtype_name(m.site.weights_dtype)}")


def _router(draw, dtype: torch.dtype, tokens: int, experts: int) -> dict:
    """Routers check accepts (every expert chosen: see routing_tie_problem), tied logits among them."""
    logits = draw(tensors((tokens, experts), dtype, scale=3.0))
    if draw(st.booleans()):  # integer logits: ties among the scores
        logits = logits.round()
    upcast = draw(st.booleans())
    return dict(router_logits=logits, compute_dtype=torch.float32 if upcast else None, top_k=experts,
                renormalize=draw(st.booleans()), weights_dtype=dtype if upcast else None)


@st.composite
def _router_examples(draw) -> Example:
    """The router in front of transformers' grouped_mm experts path, one token among the sizes."""
    dtype, tokens, experts = draw(st.sampled_from(FLOAT_DTYPES)), draw(sizes(24)), draw(st.integers(1, 6))
    router = _router(draw, dtype, tokens, experts)
    return Example(routed_grouped_mm_experts, dict(
        router, **{k: v for k, v in _experts_arguments(draw, dtype, tokens, experts, experts).items() if k != "top_k"}))


@st.composite
def _router_fused_examples(draw) -> Example:
    """The router in front of `fuser::moe_experts` (transformers' "fuser" experts implementation): separate gate
    and up weights [E, I, H], or one [E, 2I, H] (up None)."""
    dtype, tokens, experts = draw(st.sampled_from(FLOAT_DTYPES)), draw(sizes(24)), draw(st.integers(1, 6))
    hidden, intermediate = draw(sizes(40)), draw(sizes(40))
    stacked = draw(st.booleans())
    gate = draw(tensors((experts, intermediate * (2 if stacked else 1), hidden), dtype, scale=0.3))
    up = None if stacked else draw(tensors((experts, intermediate, hidden), dtype, scale=0.3))
    return Example(routed_fused_experts, dict(
        _router(draw, dtype, tokens, experts), x=draw(tensors((tokens, hidden), dtype)), gate_proj=gate, up_proj=up,
        down_proj=draw(tensors((experts, hidden, intermediate), dtype, scale=0.3))))


MOE_ROUTER = Pattern("moe_router", (Search(routed_grouped_mm_experts, _router_examples, _read_grouped_mm),
                                    Search(routed_fused_experts, _router_fused_examples, _read_fused)),
                     check_router, replace_router, describe_router, anchors=(torch.topk,))
