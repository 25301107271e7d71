"""Mixture-of-experts dispatch → `fuser::moe_experts` (token sort, grouped GEMMs with SwiGLU and the
routing weight in their epilogues, combine over top-k: one op, no host sync).

Matched: transformers 5.x's `grouped_mm` experts path (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V3
and every model on the experts interface), as `torch.compile` traces it: sort the (token, k)
pairs by expert, gather, histogram → offsets, grouped GEMM gate/up, SiLU·mul, grouped GEMM down,
routing weight, inverse permutation, sum over top-k. The router in front (and shared experts
beside) stay as they are and feed the op.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from torch import fx

from fuser.kernels import moe as _kernel  # noqa: F401  (registers torch.ops.fuser.moe_*)
from fuser.patterns.base import UNCHECKED, Example, Pattern, cast, dtype_name, structural
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
    takes every dtype (the native kernel takes bf16 only)."""
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offs=offs)


def grouped_mm_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, top_k, num_experts, max_expert,
                       histc_dtype, matmul_dtype, tokens, hidden, out_dtype):
    """transformers.integrations.moe.grouped_mm_experts_forward (gated experts, no bias)."""
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
    hidden_g = F.silu(halves[0]) * halves[1]
    down = sentinel_masked(grouped_mm(cast(hidden_g, matmul_dtype), down_proj.transpose(-2, -1), offsets),
                           expert_ids_g, num_experts)
    weighted = down * sample_weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    # `inverse[perm] = arange(S)`, spelled so fx can trace it; in-place writes into a tensor the
    # match creates join the match (the walk from the output does not meet them)
    inverse.__setitem__(perm, torch.arange(perm.numel(), device=perm.device))
    return cast(weighted[inverse].view(tokens, top_k, hidden).sum(dim=1), out_dtype)


SEARCHES = (grouped_mm_experts,)


def _ids_from_top_k(node, experts: int) -> bool:
    """The kernel takes ids in [0, E): true of `topk(scores [T, E], k)[1]` (through views and casts)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "view", "reshape", "long"):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is operator.getitem and node.args[1] == 1):
        return False
    top_k = node.args[0]
    scores = top_k.args[0] if isinstance(top_k, fx.Node) and top_k.target in (torch.topk, "topk") else None
    meta = scores.meta.get("example_value") if isinstance(scores, fx.Node) else None
    dim = top_k.kwargs.get("dim", top_k.args[2] if len(top_k.args) > 2 else -1) if scores is not None else None
    return isinstance(meta, torch.Tensor) and dim in (-1, meta.dim() - 1) and meta.shape[-1] == experts


def check(m) -> str | None:
    x, ids, weights = m.meta("x"), m.meta("top_k_index"), m.meta("top_k_weights")
    gate_up, down = m.meta("gate_up_proj"), m.meta("down_proj")
    if not all(isinstance(t, torch.Tensor) for t in (x, ids, weights, gate_up, down)):
        return "the experts' inputs are not all tensors"
    if x.dim() != 2 or ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != x.shape[0]:
        return f"hidden states {tuple(x.shape)} and top-k {tuple(ids.shape)} are not [T, H] and [T, K]"
    if ids.dtype not in (torch.int64, torch.int32) or x.dtype not in FLOAT_DTYPES:
        return f"dtypes {dtype_name(x.dtype)} / {dtype_name(ids.dtype)} not supported"
    experts, two_i, hidden = gate_up.shape if gate_up.dim() == 3 else (None, None, None)
    if experts is None or two_i % 2 or down.dim() != 3 or tuple(down.shape) != (experts, hidden, two_i // 2):
        return f"expert weights {tuple(gate_up.shape)} / {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    if hidden != x.shape[1] or m["top_k"] != ids.shape[1] or m["num_experts"] != experts \
            or m["max_expert"] != experts - 1:
        return "the histogram, top-k or hidden size disagree with the expert weights"
    if not _ids_from_top_k(m.bindings["top_k_index"], experts):
        return "expert ids do not come from a top-k over the experts (expert-parallel sentinels may be among them)"
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        return f"expert weights in {dtype_name(gate_up.dtype)}, activations in {dtype_name(x.dtype)}"
    return None


def replace(m):
    out = torch.ops.fuser.moe_experts(m["x"], m["top_k_index"], m["top_k_weights"].to(m.meta("x").dtype),
                                      m["gate_up_proj"], None, m["down_proj"])
    return out.to(m.output.meta["example_value"].dtype)


def describe(m) -> str:
    experts, two_i, hidden = m.meta("gate_up_proj").shape
    return (f"{experts} experts, top-{m['top_k']}, hidden {hidden}, intermediate {two_i // 2}, SwiGLU, "
            f"{dtype_name(m.meta('x').dtype)}")


@st.composite
def _examples(draw) -> Example:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    tokens, experts = draw(sizes(24)), draw(st.integers(1, 6))
    top_k = draw(st.integers(1, experts))
    hidden, intermediate = draw(sizes(40)), draw(sizes(40))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(tokens, experts, generator=generator)
    if draw(st.booleans()):  # every token to the same experts: the others get nothing
        scores = torch.arange(experts, dtype=torch.float32).expand(tokens, experts).clone()
    return Example(routed_experts, dict(
        x=draw(tensors((tokens, hidden), dtype)), router_probs=scores.softmax(-1).to(dtype),
        gate_up_proj=draw(tensors((experts, 2 * intermediate, hidden), dtype, scale=0.3)),
        down_proj=draw(tensors((experts, hidden, intermediate), dtype, scale=0.3)),
        top_k=top_k, num_experts=experts, max_expert=experts - 1, histc_dtype=torch.float32, matmul_dtype=None,
        tokens=tokens, hidden=hidden, out_dtype=None), constants=("router_probs",))


def routed_experts(x, router_probs, top_k, **experts_arguments):
    """The experts behind a top-k router, as models have them (the ids then provably name experts)."""
    weights, ids = torch.topk(router_probs, top_k, dim=-1)
    return grouped_mm_experts(x, ids, weights, top_k=top_k, **experts_arguments)


MOE = Pattern("moe", SEARCHES, check, replace, _examples, describe, anchors=(torch.sort,))
