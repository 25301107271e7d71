"""Mixture of experts → `fuser::moe_experts` (token sort, grouped GEMMs with the gated activation, biases and the
routing weight in their epilogues, combine over top-k: one op, no host sync).

`moe`: transformers 5.x's `grouped_mm` experts path (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V3, GPT-OSS, PhiMoE
and every model on the experts interface), as `torch.compile` traces it: sort the (token, k) pairs by expert,
gather, histogram → offsets, grouped GEMM gate/up (+ bias in place), the gating (a row per spelling in GATINGS:
SwiGLU, GPT-OSS's clamped SwiGLU on interleaved or concatenated gate/up columns), grouped GEMM down (+ bias),
routing weight, inverse permutation, sum over top-k. The weights are read as the grouped GEMMs take them (stored
transposed or not). The router in front (and shared experts beside) stay as they are and feed the op, whatever
router it is, as long as its expert ids provably name experts (`fuser.patterns.expert_ids`); the softmax top-k
router is fused with them where that is exact (`fuser.patterns.moe_routers`). Another activation, expert weights
in another dtype than the hidden states, or an in-place write the pattern does not model make a near miss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from torch import fx

from fuser.kernels.moe import LIMITS, expert_arguments
from fuser.patterns.base import Example, Pattern, Search, cast, dtype_name
from fuser.patterns.expert_ids import ids_problem, router_name, scattered_top_k
from fuser.patterns.moe_pieces import GATINGS, GROUPED_MM_NAMES, gate_activation, grouped_linear, sentinel_masked
from fuser.patterns.nodes import op_name, tensor_meta, written
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


def _experts_search(gating: str):
    """transformers.integrations.moe.grouped_mm_experts_forward with gated experts and this gating, with or
    without biases. Each grouped GEMM casts its input to the weights' dtype: the first where the hidden states
    are in another dtype, the second hardly ever (the gate/up output is in the weights' dtype already)."""
    _, _, split, glu = GATINGS[gating]

    def grouped_mm_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, top_k,
                           num_experts, max_expert, histc_dtype, matmul_dtype, down_matmul_dtype, tokens, hidden,
                           out_dtype, activation, alpha, limit, lower):
        sample_weights = top_k_weights.reshape(-1)
        expert_ids = top_k_index.reshape(-1)
        ordered = torch.sort(expert_ids)
        expert_ids_g, perm = ordered[0], ordered[1]
        selected = x[perm // top_k]
        sample_weights_g = sample_weights[perm]
        tokens_per_expert = torch.histc(cast(expert_ids_g, histc_dtype), bins=num_experts, min=0, max=max_expert)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        gate_up = sentinel_masked(grouped_linear(cast(selected, matmul_dtype), gate_up_proj, offsets, gate_up_bias,
                                                 expert_ids_g), expert_ids_g, num_experts)
        gate, up = split(gate_up)
        hidden_g = glu(gate, up, dict(activation=activation, alpha=alpha, limit=limit, lower=lower))
        down = sentinel_masked(grouped_linear(cast(hidden_g, down_matmul_dtype), down_proj, offsets, down_bias,
                                              expert_ids_g), expert_ids_g, num_experts)
        weighted = down * sample_weights_g.unsqueeze(-1)
        inverse = torch.empty_like(perm)
        # `inverse[perm] = arange(S)`, spelled so fx can trace it; in-place writes into a tensor the
        # match creates join the match (the walk from the output does not meet them)
        inverse.__setitem__(perm, torch.arange(perm.numel(), device=perm.device))
        return cast(weighted[inverse].view(tokens, top_k, hidden).sum(dim=1), out_dtype)

    grouped_mm_experts.__name__ = f"grouped_mm_experts ({gating})"
    return grouped_mm_experts


def experts_problem(m) -> str | None:
    """What the kernel does not take in the experts themselves: their activation, weights and sizes. The weights
    are read as the grouped GEMMs take them: gate_up [E, H, 2I], down [E, I, H]."""
    x, gate_up, down = m.meta("x"), m.meta("gate_up_proj"), m.meta("down_proj")
    if not all(isinstance(t, torch.Tensor) for t in (x, gate_up, down)):
        return "the experts' inputs are not all tensors"
    problem = _gating_problem(m)
    if problem is not None:
        return problem
    if x.dim() != 2 or x.dtype not in LIMITS.dtypes:
        return f"hidden states {tuple(x.shape)} in {dtype_name(x.dtype)} are not [T, H] in float16/bfloat16/float32"
    experts, hidden, two_i = gate_up.shape if gate_up.dim() == 3 else (None, None, None)
    if experts is None or two_i % 2 or down.dim() != 3 or tuple(down.shape) != (experts, two_i // 2, hidden):
        return f"expert weights {tuple(gate_up.shape)} / {tuple(down.shape)} are not [E, H, 2I] / [E, I, H] (as the " \
               "grouped GEMMs take them)"
    if hidden != x.shape[1] or m["num_experts"] != experts or m["max_expert"] != experts - 1:
        return "the histogram or hidden size disagree with the expert weights"
    biases = [m.meta(name) for name in ("gate_up_bias", "down_bias")]
    if (biases[0] is None) != (biases[1] is None):
        return "only one of the experts' two projections has a bias"
    if biases[0] is not None and (tuple(biases[0].shape) != (experts, two_i) or tuple(biases[1].shape) !=
                                  (experts, hidden)):
        return f"expert biases {tuple(biases[0].shape)} / {tuple(biases[1].shape)} are not [E, 2I] / [E, H]"
    dtypes = {t.dtype for t in (gate_up, down, *biases) if t is not None}
    if dtypes != {x.dtype}:
        return f"expert weights in {' and '.join(sorted(map(dtype_name, dtypes)))}, activations in {dtype_name(x.dtype)}"
    return _writes_problem(m)


def _gating_problem(m) -> str | None:
    activation = GATINGS[m.site.gating][0]
    if activation == "silu":
        return None if m["activation"] == "silu" else (
            f"the experts' activation is {m['activation']}, not SiLU: the kernel fuses SwiGLU (silu(gate) · up) and "
            "GPT-OSS's clamped SwiGLU only")
    alpha, limit, lower = m["alpha"], m["limit"], m["lower"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, limit, lower)):
        return "the clamped SwiGLU's alpha and limits are not constant numbers"
    if not (limit >= 0 and lower == -limit and math.isfinite(alpha)):
        return f"the clamped SwiGLU clamps up to [{lower}, {limit}], not [-limit, limit] for a limit >= 0"
    return None


def _writes_problem(m) -> str | None:
    """In-place writes in the match are modeled or provably change nothing: the inverse permutation's setitem,
    the biases' `out.add_(bias[ids])` (grouped_linear), a router's renormalization `w /= w.sum(...)` (the
    `renormalized` piece of `moe_router`), and transformers 5.17's sentinel handling (`masked_fill_` where ids
    ≥ E, `clamp_(max=E - 1)`), a no-op on ids from a router (`check`)."""
    biases = {m.bindings.get("gate_up_bias"), m.bindings.get("down_bias")} - {None}
    for node in m.nodes:
        if not written(node):
            continue
        name, target = op_name(node), (node.args[0] if node.args else None)
        added = node.args[1] if name == "add_" and len(node.args) == 2 else None
        if name in ("setitem", "__setitem__") and op_name(target) == "empty_like":
            continue
        if op_name(added) == "getitem" and added.args[0] in biases and \
                getattr(getattr(target, "target", None), "__name__", None) in GROUPED_MM_NAMES:
            continue
        if name in ("masked_fill_", "clamp_") and _sentinel_no_op(node, m["num_experts"]):
            continue
        if name == "itruediv" and op_name(node.args[1]) == "sum" and node.args[1].args[0] is target \
                and op_name(target) == "getitem" and op_name(target.args[0]) == "topk" and target.args[1] == 0:
            continue  # the router's top-k weights, renormalized
        return f"the experts' code writes into {getattr(target, 'name', target)} in place ({name}), which the " \
               "kernel does not model"
    return None


def _sentinel_no_op(node, experts: int) -> bool:
    """`x.masked_fill_((ids >= E).unsqueeze(-1), 0)` or `ids.clamp_(max=E - 1)`."""
    if op_name(node) == "clamp_":
        return node.kwargs == {"max": experts - 1} and len(node.args) == 1
    mask = node.args[1] if len(node.args) == 3 else None
    above = mask.args[0] if op_name(mask) == "unsqueeze" else None
    return op_name(above) == "ge" and above.args[1] == experts and node.args[2] == 0


def check(m) -> str | None:
    if isinstance(m.site, DenseRouting):
        return _dense_problem(m)
    x, ids, weights = m.meta("x"), m.meta("top_k_index"), m.meta("top_k_weights")
    if not all(isinstance(t, torch.Tensor) for t in (x, ids, weights)):
        return "the experts' inputs are not all tensors"
    if ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != x.shape[0] or m["top_k"] != ids.shape[1]:
        return f"hidden states {tuple(x.shape)} and top-k {tuple(ids.shape)} are not [T, H] and [T, K]"
    if ids.dtype not in (torch.int64, torch.int32):
        return f"expert ids in {dtype_name(ids.dtype)}, not int32/int64"
    problem = experts_problem(m)
    return problem or ids_problem(m.bindings["top_k_index"], m.meta("gate_up_proj").shape[0], frozenset(m.nodes))


def experts_tensors(m) -> tuple:
    """`fuser::moe_experts`'s expert arguments for the grouped_mm experts of `m`, from the bound weights as the
    grouped GEMMs take them ([E, H, 2I], [E, I, H]) and the biases."""
    activation, layout, _, _ = GATINGS[m.site.gating]
    gating = (activation, float(m["alpha"]), float(m["limit"])) if activation != "silu" else ("silu", 1.0, 0.0)
    return expert_arguments(m["gate_up_proj"].transpose(1, 2), m["down_proj"].transpose(1, 2), m.get("gate_up_bias"),
                            m.get("down_bias"), layout == "interleaved", gating)


def fused_experts(m, ids, weights):
    """`fuser::moe_experts` in place of the grouped_mm experts path of `m` (weights in the activations' dtype)."""
    out = torch.ops.fuser.moe_experts(m["x"], ids, weights.to(m.meta("x").dtype), *experts_tensors(m))
    return out.to(tensor_meta(m.output).dtype)


def replace(m):
    if isinstance(m.site, DenseRouting):
        return _replace_dense(m)
    return fused_experts(m, m["top_k_index"], m["top_k_weights"])


def describe(m) -> str:
    experts, hidden, two_i = m.meta("gate_up_proj").shape
    if isinstance(m.site, DenseRouting):
        return (f"{experts} experts, top-{tensor_meta(m.site.ids).shape[1]} of Llama-4's dense sigmoid scores, "
                f"hidden {hidden}, intermediate {two_i // 2}, swiglu, inputs scaled, {dtype_name(m.meta('x').dtype)}")
    bias = ", biased" if m.meta("gate_up_bias") is not None else ""
    return (f"{experts} experts, top-{m['top_k']}, hidden {hidden}, intermediate {two_i // 2}, {m.site.gating}{bias}, "
            f"{dtype_name(m.meta('x').dtype)}, fed by {router_name(m.bindings['top_k_index'])}")


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


def experts_arguments(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, top_k: int, *,
                      gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                      gating: str = "swiglu", stored_transposed: bool = False, limit: float = 7.0) -> dict:
    """The grouped_mm experts' arguments besides the routing, as transformers passes them. The weights as
    transformers stores them: [E, 2I, H] / [E, H, I], or stored_transposed [E, H, 2I] / [E, I, H] (GPT-OSS);
    biases [E, 2I] / [E, H] or none; `gating` one of GATINGS (GPT-OSS's alpha, a limit given)."""
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

    experts, clamped = gate_up_proj.shape[0], GATINGS[gating][0] == "clamped_swiglu"
    return dict(x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias,
                top_k=top_k, num_experts=experts, max_expert=experts - 1, histc_dtype=torch.float32,
                matmul_dtype=None, down_matmul_dtype=None, tokens=x.shape[0], hidden=x.shape[1], out_dtype=None,
                activation=None if clamped else "silu", alpha=1.702 if clamped else None,
                limit=limit if clamped else None, lower=-limit if clamped else None, gating=gating,
                stored_transposed=stored_transposed)


def draw_experts_arguments(draw, dtype: torch.dtype, tokens: int, experts: int, top_k: int, gating: str) -> dict:
    """Hidden states, expert weights (and biases, or none) of any size from 1 and any layout; for the clamped
    gatings, a limit the pre-activations cross or one they hardly reach."""
    hidden, intermediate = draw(sizes(40)), draw(sizes(40))
    transposed = draw(st.booleans())
    gate_up_shape, down_shape = ((experts, hidden, 2 * intermediate), (experts, intermediate, hidden)) if transposed \
        else ((experts, 2 * intermediate, hidden), (experts, hidden, intermediate))
    biases = {}
    if draw(st.booleans()):
        biases = dict(gate_up_bias=draw(tensors((experts, 2 * intermediate), dtype, scale=0.3)),
                      down_bias=draw(tensors((experts, hidden), dtype, scale=0.3)))
    return experts_arguments(draw(tensors((tokens, hidden), dtype)), draw(tensors(gate_up_shape, dtype, scale=0.3)),
                             draw(tensors(down_shape, dtype, scale=0.3)), top_k, gating=gating,
                             stored_transposed=transposed, limit=draw(st.sampled_from([0.5, 7.0])), **biases)


@st.composite
def _examples(draw, routing: str | None = None, gating: str = "swiglu") -> Example:
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
    return routed_example(scores.softmax(-1).to(dtype),
                          draw_experts_arguments(draw, dtype, tokens, experts, top_k, gating))


def routed_example(router_probs: torch.Tensor, experts: dict) -> Example:
    """`routed_experts` on these router probabilities and `experts_arguments`."""
    return Example(routed_experts, dict(router_probs=router_probs, **experts), constants=("router_probs",))


def routed_experts(x, router_probs, top_k, gate_up_proj, down_proj, gating, stored_transposed, **experts_arguments):
    """The experts behind a top-k router, as models have them (the ids then provably name experts); weights
    stored [E, 2I, H] are transposed for the grouped GEMMs, as transformers does."""
    weights, ids = torch.topk(router_probs, top_k, dim=-1)
    if not stored_transposed:
        gate_up_proj, down_proj = gate_up_proj.transpose(-2, -1), down_proj.transpose(-2, -1)
    return EXPERTS_SEARCHES[gating](x, ids, weights, gate_up_proj=gate_up_proj, down_proj=down_proj, top_k=top_k,
                                    **experts_arguments)


@dataclass(frozen=True)
class RoutedExperts:
    """The experts a match holds, as its spelling holds them (`Search.read`)."""
    problem: Any                 # match -> what the kernel does not take in these experts, or None
    weights_dtype: torch.dtype   # the dtype the experts take their routing weights in
    fused: Any                   # (match, ids, weights) -> the experts' output through fuser::moe_experts
    gating: str = "swiglu"       # which of GATINGS


EXPERTS_SEARCHES = {gating: _experts_search(gating) for gating in GATINGS}


# --- Llama-4's dense experts -------------------------------------------------------------------------------------

def dense_experts(x, router_scores, gate_up_proj, down_proj, num_experts, hidden, activation):
    """Llama-4's text experts (`Llama4TextMoe` over `Llama4TextExperts`): every expert runs on every token, its
    input scaled by the token's dense routing score (0 off the chosen experts), summed over the experts."""
    routed_in = x.repeat(num_experts, 1) * router_scores.transpose(-2, -1).reshape(-1, 1)  # canonical: (0, 1)
    gate_up = torch.bmm(routed_in.view(num_experts, -1, hidden), gate_up_proj)
    halves = gate_up.chunk(2, dim=-1)
    out = torch.bmm(halves[1] * gate_activation(halves[0], activation), down_proj).view(-1, hidden)
    return out.reshape(num_experts, -1, hidden).sum(dim=0)


@dataclass(frozen=True)
class DenseRouting:
    """What Llama-4's router gives its dense experts (`scattered_top_k`): the chosen ids, or why not read."""
    ids: fx.Node | None
    problem: str | None


def _dense_problem(m) -> str | None:
    x, scores, gate_up, down = (m.meta(n) for n in ("x", "router_scores", "gate_up_proj", "down_proj"))
    if not all(isinstance(t, torch.Tensor) for t in (x, scores, gate_up, down)):
        return "the experts' inputs are not all tensors"
    if m["activation"] != "silu":
        return f"the experts' activation is {m['activation']}, not SiLU"
    experts, hidden, two_i = gate_up.shape if gate_up.dim() == 3 else (None, None, None)
    if x.dim() != 2 or tuple(scores.shape) != (x.shape[0], experts) or hidden != x.shape[1] or two_i % 2 \
            or tuple(down.shape) != (experts, two_i // 2, hidden) or (m["num_experts"], m["hidden"]) != (experts, hidden):
        return (f"hidden states {tuple(x.shape)}, scores {tuple(scores.shape)} and expert weights "
                f"{tuple(gate_up.shape)} / {tuple(down.shape)} are not [T, H], [T, E], [E, H, 2I], [E, I, H]")
    if x.dtype not in LIMITS.dtypes or {scores.dtype, gate_up.dtype, down.dtype} != {x.dtype}:
        return "the hidden states, routing scores and expert weights are not in one of float16/bfloat16/float32"
    return m.site.problem


def _replace_dense(m):
    """Per choice k, the experts on x scaled by its score: expert(s · x) is no multiple of expert(x), so the
    score scales the input (rounded as the original's `routed_in * scores`) and the routing weight is 1."""
    ids = m.value_of(m.site.ids)
    weights = m["router_scores"].gather(1, ids)
    gate_up, down = m["gate_up_proj"].transpose(1, 2), m["down_proj"].transpose(1, 2)
    out = None
    for k in range(tensor_meta(m.site.ids).shape[1]):
        weight = weights[:, k:k + 1]
        term = torch.ops.fuser.moe_experts(m["x"] * weight, ids[:, k:k + 1], torch.ones_like(weight), gate_up, None,
                                           down)
        out = term if out is None else out + term
    return out


def llama4_routed_experts(x, router_logits, top_k, gate_up_proj, down_proj, num_experts, hidden, activation):
    """Llama-4's router (`Llama4Router`) feeding its dense experts, as transformers writes them."""
    top_value, top_ids = torch.topk(router_logits, top_k, dim=1)
    scores = torch.full_like(router_logits, float("-inf")).scatter_(1, top_ids, top_value)
    scores = torch.sigmoid(scores.float()).to(scores.dtype)
    return dense_experts(x, scores, gate_up_proj, down_proj, num_experts, hidden, activation)


@st.composite
def _dense_examples(draw) -> Example:
    """Llama-4's experts behind its router, top-1 (its models) or more, weights [E, H, 2I] / [E, I, H]."""
    dtype, tokens, experts = draw(st.sampled_from(FLOAT_DTYPES)), draw(sizes(24)), draw(st.integers(1, 6))
    hidden, intermediate = draw(sizes(40)), draw(sizes(40))
    return Example(llama4_routed_experts, dict(
        x=draw(tensors((tokens, hidden), dtype)), router_logits=draw(tensors((tokens, experts), dtype, scale=2.0)),
        top_k=draw(st.integers(1, experts)), gate_up_proj=draw(tensors((experts, hidden, 2 * intermediate), dtype,
                                                                       scale=0.3)),
        down_proj=draw(tensors((experts, intermediate, hidden), dtype, scale=0.3)), num_experts=experts,
        hidden=hidden, activation="silu"))


def _read_dense(m) -> DenseRouting:
    scores = m.bindings["router_scores"]
    experts = tensor_meta(scores).shape[-1] if tensor_meta(scores) is not None else 0
    return DenseRouting(*scattered_top_k(scores, experts, frozenset(m.nodes)))


def _experts_row(gating: str) -> Search:
    return Search(EXPERTS_SEARCHES[gating], lambda routing=None: _examples(routing, gating),
                  lambda m: RoutedExperts(experts_problem, m.meta("x").dtype, fused_experts, gating))


MOE = Pattern("moe", (*(_experts_row(gating) for gating in GATINGS),
                      Search(dense_experts, _dense_examples, _read_dense)), check, replace, describe,
              anchors=(torch.sort, "repeat"))
