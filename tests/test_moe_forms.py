"""The `moe` pattern on the grouped_mm experts code of transformers 5.17 (the version on the GPU
machine), which masks expert-parallel sentinel rows in place and after each grouped GEMM."""
import torch
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

from helpers import compile_and_run
from numerics import assert_close

E, K = 6, 2


def experts_as_in_transformers_5_17(hidden_states, router_logits, gate_up_proj, down_proj):
    top_k_weights, top_k_index = torch.topk(router_logits.softmax(-1), K, dim=-1)
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    tokens_per_expert = torch.histc(expert_ids_g.float(), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    sentinel_mask = (expert_ids_g >= E).unsqueeze(-1)
    expert_ids_g.clamp_(max=E - 1)
    selected_hidden_states_g.masked_fill_(sentinel_mask, 0.0)
    out = torch.ops.transformers.grouped_mm_fallback(selected_hidden_states_g, gate_up_proj.transpose(-2, -1),
                                                     offs=offsets)
    gate, up = out.masked_fill(sentinel_mask, 0.0).chunk(2, dim=-1)
    out = torch.ops.transformers.grouped_mm_fallback(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=offsets)
    weighted_out = out.masked_fill(sentinel_mask, 0.0) * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted_out[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def test_the_sentinel_masking_form_is_one_moe():
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(11, 16, generator=g), torch.randn(11, E, generator=g)
    gate_up, down = torch.randn(E, 2 * 12, 16, generator=g) * 0.3, torch.randn(E, 16, 12, generator=g) * 0.3
    out, report = compile_and_run(experts_as_in_transformers_5_17, x, logits, gate_up, down, options={"strict": True})
    assert report.counts().get("moe") == 1, report
    assert report.matches[-1].op == "fuser::moe_experts"
    expected = experts_as_in_transformers_5_17(x.double(), logits.double(), gate_up.double(), down.double())
    assert_close(out, expected, torch.float32)


def dense_loop_moe(hidden_states, router_logits, gate_up_proj, down_proj):
    """A loop MoE Dynamo captures whole: every expert on every token, weighted by the scattered top-k scores
    (no transformers model spells its experts so: their loops select tokens with torch.where / nonzero)."""
    top_k_weights, top_k_index = torch.topk(router_logits.softmax(-1), K, dim=-1)
    dense = torch.zeros_like(router_logits).scatter(1, top_k_index, top_k_weights)
    out = torch.zeros_like(hidden_states)
    for e in range(E):
        gate, up = F.linear(hidden_states, gate_up_proj[e]).chunk(2, dim=-1)
        out = out + dense[:, e, None] * F.linear(F.silu(gate) * up, down_proj[e])
    return out


def test_a_dense_loop_is_left_as_it_is():
    """Captured without a graph break, not rewritten (no pattern reads a loop over experts), values unchanged."""
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(7, 16, generator=g), torch.randn(7, E, generator=g)
    gate_up, down = torch.randn(E, 2 * 12, 16, generator=g) * 0.3, torch.randn(E, 16, 12, generator=g) * 0.3
    out, report = compile_and_run(dense_loop_moe, x, logits, gate_up, down, options={"strict": True})
    assert "moe" not in report.counts(), report
    torch._dynamo.reset()
    assert torch._dynamo.explain(dense_loop_moe)(x, logits, gate_up, down).graph_break_count == 0
    assert_close(out, dense_loop_moe(x.double(), logits.double(), gate_up.double(), down.double()), torch.float32)
