"""Mixture-of-experts dispatch → `fuser::moe_experts` (token sort, grouped GEMMs with SwiGLU and the
routing weight in their epilogues, combine over top-k: one op, no host sync).

Matched: transformers 5.x's `grouped_mm` experts path (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V3
and every model on the experts interface), as `torch.compile` traces it: sort the (token, k)
pairs by expert, gather, histogram → offsets, grouped GEMM gate/up, SiLU·mul, grouped GEMM down,
routing weight, inverse permutation, sum over top-k. The router in front (and shared experts
beside) stay as they are and feed the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from fuser.kernels import moe as _kernel  # noqa: F401  (registers torch.ops.fuser.moe_*)
from fuser.patterns.base import Example, Pattern, cast, dtype_name
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


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
    gate_up = torch._grouped_mm(cast(selected, matmul_dtype), gate_up_proj.transpose(-2, -1), offs=offsets)
    halves = gate_up.chunk(2, dim=-1)
    hidden_g = F.silu(halves[0]) * halves[1]
    down = torch._grouped_mm(cast(hidden_g, matmul_dtype), down_proj.transpose(-2, -1), offs=offsets)
    weighted = down * sample_weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)  # then `inverse[perm] = torch.arange(pairs)`: the matcher takes in-place
    # writes into tensors the match creates along with it (an fx proxy cannot show an assignment)
    return cast(weighted[inverse].view(tokens, top_k, hidden).sum(dim=1), out_dtype)


SEARCHES = (grouped_mm_experts,)


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
    weights, ids = torch.topk(scores.softmax(-1), top_k, dim=-1)
    return Example(grouped_mm_experts, dict(
        x=draw(tensors((tokens, hidden), dtype)), top_k_index=ids, top_k_weights=weights.to(dtype),
        gate_up_proj=draw(tensors((experts, 2 * intermediate, hidden), dtype, scale=0.3)),
        down_proj=draw(tensors((experts, hidden, intermediate), dtype, scale=0.3)),
        top_k=top_k, num_experts=experts, max_expert=experts - 1, histc_dtype=torch.float32, matmul_dtype=None,
        tokens=tokens, hidden=hidden, out_dtype=None))


MOE = Pattern("moe", SEARCHES, check, replace, _examples, describe, anchors=(torch.sort,))
