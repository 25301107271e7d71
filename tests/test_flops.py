"""Every fused op reports its FLOPs to FlopCounterMode, by torch's own convention (kernels/runtime/flops.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import fuser  # noqa: F401  (registers torch.ops.fuser.*)
from fuser.kernels.runtime.flops import FORMULAS


def counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_every_op_beneath_an_entry_op_has_a_formula():
    """The ops the counter meets: every fuser:: op but the CompositeImplicitAutograd entry ops above them."""
    entry = {"attention", "rms_norm", "softmax", "moe_experts", "moe_route", "mla_decode"}
    defined = {name for name in dir(torch.ops.fuser) if isinstance(getattr(torch.ops.fuser, name),
                                                                  torch._ops.OpOverloadPacket)}
    assert defined - entry == set(FORMULAS)
    assert all(getattr(torch.ops.fuser, name) in flop_registry for name in FORMULAS)


def test_attention_counts_what_sdpa_counts():
    """Forward and backward, as torch counts F.scaled_dot_product_attention on the same shapes."""
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True), torch.randn(2, 3, 20, 8, requires_grad=True),
               torch.randn(2, 3, 20, 12, requires_grad=True))

    def ours(q, k, v):
        torch.ops.fuser.attention(q, k, v, None, 0.3, False, 0, False, 0.0, 0.0, float("-inf"), "sdpa").sum().backward()

    def sdpa(q, k, v):
        F.scaled_dot_product_attention(q, k, v, scale=0.3).sum().backward()
    assert counted(ours, q, k, v) == counted(sdpa, q, k, v) > 0


def test_mla_decode_counts_its_products():
    batch, new, heads, latent, rope, context = 2, 3, 4, 24, 8, 37
    args = (torch.randn(batch, new, heads, latent), torch.randn(batch, new, heads, rope),
            torch.randn(batch, context, latent), torch.randn(batch, context, rope), 0.2)
    forward = 2 * batch * new * heads * context * (2 * latent + rope)
    assert counted(torch.ops.fuser.mla_decode, *args) == forward
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    assert counted(lambda *a: torch.ops.fuser.mla_decode(*a).sum().backward(), *leaves) == 3 * forward


def test_norms_count_nothing_as_in_torch():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert counted(torch.ops.fuser.rms_norm, x, w, 1e-6, 0.0, False, torch.float32) == 0
    assert counted(torch.ops.fuser.softmax, x, torch.float32) == 0 == counted(torch.softmax, x, -1)


def test_experts_and_gated_delta_count_their_products():
    tokens, hidden, intermediate, experts, top_k = 5, 16, 12, 4, 2
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    gate_up, down = torch.randn(experts, 2 * intermediate, hidden), torch.randn(experts, hidden, intermediate)
    assert counted(torch.ops.fuser.moe_experts, x, ids, torch.rand(tokens, top_k), gate_up, None, down) == \
        6 * tokens * top_k * hidden * intermediate
    batch, length, heads, dk, dv = 1, 3, 2, 8, 12
    q, k = torch.randn(batch, length, heads, dk), torch.randn(batch, length, heads, dk)
    v, g, beta = torch.randn(batch, length, heads, dv), -torch.rand(batch, length, heads), torch.rand(batch, length, heads)
    assert counted(torch.ops.fuser.gated_delta_rule, q, k, v, g, beta, None, 0.3, True) == \
        6 * batch * length * heads * dk * dv
