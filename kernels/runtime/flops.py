"""FLOPs of the fused ops for `torch.utils.flop_counter.FlopCounterMode` (users measure MFU with it).

A fused op is opaque to the counter (its kernels, or its reference run beneath the mode, are not seen), so each
op the counter meets — the custom ops beneath the CompositeImplicitAutograd entry ops — has a formula here,
counted by torch's own convention so that a converted model and its original report the same work: 2 FLOPs
per multiply-add of the matrix products the op stands for, scores counted over every key (no causal
discount, as torch's SDPA formula), the backward's four products as torch counts SDPA's backward;
elementwise and reduction work counts nothing (torch has no formula for the norms, softmaxes and routing these
ops replace). The gated delta rule, whose original mixes products and elementwise updates, counts its
recurrence's three state products per token and value head (read Sᵀk, rank-1 update, output Sᵀq).
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula


def _attention(q, k, v, *_, out_shape=None, **__) -> int:
    """q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]: q·kᵀ and p·v."""
    batch, heads, queries, d = q
    return 2 * batch * heads * queries * k[2] * (d + v[3])


def _attention_backward(grad_out, q, k, v, *_, out_shape=None, **__) -> int:
    return 2 * _attention(q, k, v)


def _nothing(*_, **__) -> int:
    return 0


def _experts(x, ids, weights, gate, up, down, *_, out_shape=None, **__) -> int:
    """Each (token, k) row: gate and up [I, H] products and the down [H, I] product (the biases' additions,
    rows·(2I + H), are not products and are not counted)."""
    rows, hidden, intermediate = math.prod(ids), x[-1], down[-1]
    return 6 * rows * hidden * intermediate


def _experts_backward(grad_out, x, ids, weights, gate, up, down, gate_bias, up_bias, down_bias, activation, alpha,
                      limit, plan, act, h, needs_x, needs_weights, needs_params, *_, out_shape=None, **__) -> int:
    """The gradient of h through down, of x through gate and up, and of the weights (each the forward's size)."""
    rows, hidden, intermediate = math.prod(ids), x[-1], down[-1]
    return 2 * rows * hidden * intermediate * (1 + (2 if needs_x else 0) + (3 if needs_params else 0))


def _gated_delta(q, k, v, *_, out_shape=None, **__) -> int:
    batch, length, _, dk = k
    return 6 * batch * length * v[2] * dk * v[3]


def _gated_delta_backward(grad_out, grad_state, q, k, v, *_, out_shape=None, **__) -> int:
    return 2 * _gated_delta(q, k, v)


def _mla_decode(q_lat, q_pe, c, *_, out_shape=None, **__) -> int:
    """q_lat [B, Lq, H, R], q_pe [B, Lq, H, P], c [B, Lctx, R]: scores over R + P, then p·c over R."""
    batch, new_tokens, heads, latent = q_lat
    return 2 * batch * new_tokens * heads * c[1] * (2 * latent + q_pe[3])


def _mla_decode_backward(grad_out, q_lat, q_pe, c, *_, out_shape=None, **__) -> int:
    return 2 * _mla_decode(q_lat, q_pe, c)


FORMULAS = {
    "attention_forward": _attention, "attention_backward": _attention_backward,
    "rms_norm_forward": _nothing, "rms_norm_backward": _nothing,
    "softmax_forward": _nothing, "softmax_backward": _nothing,
    "moe_route_forward": _nothing, "moe_route_backward": _nothing,
    "moe_experts_forward": _experts, "moe_experts_backward": _experts_backward,
    "gated_delta_rule": _gated_delta, "gated_delta_rule_backward": _gated_delta_backward,
    "mla_decode_forward": _mla_decode, "mla_decode_backward": _mla_decode_backward,
}


def register_flop_formulas() -> None:
    """Register every formula on its `fuser::` op (once: the counter refuses a second registration)."""
    from torch.utils.flop_counter import flop_registry

    for name, formula in FORMULAS.items():
        op = getattr(torch.ops.fuser, name)
        if op not in flop_registry:
            register_flop_formula(op)(formula)
