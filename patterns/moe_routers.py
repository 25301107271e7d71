"""The router in front of the experts: softmax → top-k → renormalization → `fuser::moe_route`, with the
experts it feeds (transformers' grouped_mm path, or `fuser::moe_experts` itself under transformers' "fuser"
experts implementation) → `fuser::moe_route` + `fuser::moe_experts`.

The match holds the experts too, so it runs before `moe`. It is exact only where every expert is chosen (top-k =
number of experts): the kernel breaks ties in the scores by lowest expert index and torch.topk by its own order,
so below that a tie at the k-th place would send a token to another expert (`routing_tie_problem`). There the
router is a near miss with that reason and `moe` fuses the experts alone. Other routers (DeepSeek-V3's
group-limited sigmoid, GPT-OSS's top-k then softmax, Llama-4's sigmoid top-1, PhiMoE's sparse mixer) are not
matched here: they stay as they are and feed the fused experts (`fuser.patterns.expert_ids`).
"""
from __future__ import annotations

import operator

import torch
from hypothesis import strategies as st
from torch import fx

from fuser.kernels.moe import LIMITS
from fuser.kernels.moe.route import routing_tie_problem
from fuser.patterns.base import Example, Pattern, Search, cast, dtype_name, structural
from fuser.patterns.moe import EXPERTS_SEARCHES, RoutedExperts, draw_experts_arguments, experts_problem, fused_experts
from fuser.patterns.nodes import tensor_meta
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


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
    """The router feeding transformers' grouped_mm path of bias-free SwiGLU experts (the match then holds both,
    so it runs before `moe`, which takes the experts alone where the router stays)."""
    top = _softmax_top_k(router_logits, compute_dtype, top_k)
    weights = cast(renormalized(top[0], renormalize), weights_dtype)
    return EXPERTS_SEARCHES["swiglu"](x, top[1], weights, gate_up_proj, down_proj, None, None, top_k, num_experts,
                                      max_expert, histc_dtype, matmul_dtype, down_matmul_dtype, tokens, hidden,
                                      out_dtype, activation, None, None, None)


_EXPERTS_ARGUMENTS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias", "activation", "alpha",
                      "limit")


def routed_fused_experts(router_logits, compute_dtype, top_k, renormalize, weights_dtype, x, gate_proj, up_proj,
                         down_proj, gate_bias, up_bias, down_bias, activation, alpha, limit):
    """The router feeding `fuser::moe_experts` itself (the "fuser" experts implementation of transformers)."""
    top = _softmax_top_k(router_logits, compute_dtype, top_k)
    weights = cast(renormalized(top[0], renormalize), weights_dtype)
    return torch.ops.fuser.moe_experts(x, top[1], weights, gate_proj, up_proj, down_proj, gate_bias, up_bias,
                                       down_bias, activation, alpha, limit)


def _read_grouped_mm(m) -> RoutedExperts:
    return RoutedExperts(experts_problem, m.meta("x").dtype, fused_experts)


def _read_fused(m) -> RoutedExperts:
    def fused(m, ids, weights):
        return torch.ops.fuser.moe_experts(m["x"], ids, weights, *(m[name] for name in _EXPERTS_ARGUMENTS))
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
    experts_arguments = draw_experts_arguments(draw, dtype, tokens, experts, experts, "swiglu")
    if not experts_arguments.pop("stored_transposed"):  # the grouped GEMMs' weights, as routed_experts makes them
        for name in ("gate_up_proj", "down_proj"):
            experts_arguments[name] = experts_arguments[name].transpose(-2, -1)
    dropped = ("top_k", "gating", "gate_up_bias", "down_bias", "alpha", "limit", "lower")
    return Example(routed_grouped_mm_experts, dict(router, **{k: v for k, v in experts_arguments.items()
                                                              if k not in dropped}))


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
        down_proj=draw(tensors((experts, hidden, intermediate), dtype, scale=0.3)), gate_bias=None, up_bias=None,
        down_bias=None, activation="silu", alpha=1.0, limit=0.0))


MOE_ROUTER = Pattern("moe_router", (Search(routed_grouped_mm_experts, _router_examples, _read_grouped_mm),
                                    Search(routed_fused_experts, _router_fused_examples, _read_fused)),
                     check_router, replace_router, describe_router, anchors=(torch.topk,))
