"""`torch.ops.fuser.attention`: naive attention as one fused flash-attention op.

    attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int window,
              bool bottom_right, float softcap, float dropout_p, float mask_value, str masking="fill",
              Tensor? sinks=None) -> Tensor
    AttentionLiterals(scale, causal=True, ...).call(q, k, v, mask, sinks)   # the same call, literals by name

q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], any strides; query head h reads KV head
h // (Hq // Hkv). Output [B, Hq, Lq, Dv] in q's dtype (laid out [B, Lq, Hq, Dv] in memory when q
is a transposed view of that layout). It computes, in float32:
    s = q·k·scale; s = softcap·tanh(s/softcap) if softcap > 0; s += mask if float;
    excluded scores (bool mask False, causal: key after query, window: query − key ≥ window, query i at
    position i + (Lk − Lq if bottom_right else 0)) become mask_value ("fill") or s + mask_value ("add");
    p = softmax(s), with "sdpa" 0 on rows whose scores are all −inf, with `sinks` (broadcast to [B, Hq, Lq])
    one more score per row in the denominator (sinks.py); dropout(p); out = p·v.
`masking` names the code replaced (reference.py): masked_fill / where ("fill"), an additive 0/fill
mask ("add"), F.scaled_dot_product_attention ("sdpa"). Fully masked rows follow that code: NaN
with mask_value −inf, the average of V over all keys with a finite fill, a softmax over score + fill
for "add", zeros for "sdpa" (and their gradients: see backward.py). Scores below −FLT_MAX/log2(e)
(≈ −2.4e38: finfo(float32/bfloat16).min fills) count as equal, as they do in float64 once a score is
added to them. Gradients flow to q, k, v, the sinks and a float mask (a learned bias: dS from the dQ kernel,
summed over the axes the mask broadcasts on), never to a bool mask.
Dropout draws its own Philox stream (not torch's); the backward regenerates the same keep-mask.
NaN and ±inf: a value at a position a row cannot see never reaches that row (reference.py).
The kernels take what `LIMITS` says; anything else (and CPU without TRITON_INTERPRET=1) runs
`attention_reference` and its explicit backward.

Ops: `attention` is CompositeImplicitAutograd: it draws the dropout seed on the CPU generator (no
device sync) and calls `attention_forward` -> (out, row statistics, tile classes), whose autograd calls
`attention_backward`. Both are custom ops with fake functions and a reference path; their Python
signatures below are their schemas.

Reading order: plan.py (what a call means in kernel terms, and its launches), forward.py, backward.py,
tiles.py (what they share), reference.py (the formula they compute).
"""
from __future__ import annotations

import torch

from ..runtime import BatchAndHeads, direct_call, register_sharding
from . import plan
from .forward import output_like
from .plan import LIMITS, AttentionLimits
from .reference import LOG2E, AttentionLiterals, attention_reference, reference_backward, reference_forward
from .sinks import check_sinks, join_sinks, sinks_gradient
from .tiles import class_map_shape

__all__ = ["LIMITS", "AttentionLimits", "AttentionLiterals", "attention_reference", "attention_forward",
           "attention_backward"]

_LIBRARY = torch.library.Library("fuser", "FRAGMENT")
_LIBRARY.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int window, "
                "bool bottom_right, float softcap, float dropout_p, float mask_value, str masking=\"fill\", "
                "Tensor? sinks=None) -> Tensor")


def _attention(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking="fill",
               sinks=None):
    literals = AttentionLiterals(scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if literals.dropout_p > 0 else None
    return _call_forward(q, k, v, mask, sinks, *literals, seed)[0]


_LIBRARY.impl("attention", _attention, "CompositeImplicitAutograd")


def _plan(q, k, v, mask, literals: AttentionLiterals) -> plan.Plan | None:
    """The launch plan of this call, cached per signature; None where the reference runs."""
    return plan.plan_for(plan.signature(q, k, v, mask, literals=literals),
                         lambda: plan.build_plan(q, k, v, mask, literals))


def _generator(seed: torch.Tensor | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed.item()))


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             sinks: torch.Tensor | None, scale: float, causal: bool, window: int, bottom_right: bool, softcap: float,
             dropout_p: float, mask_value: float, masking: str, seed: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, row statistics [B, Hq, Lq, 2] float32 whose sum is the log2-sum-exp of the scores, sinks included
    (+inf on rows "sdpa" zeroes), tile classes of the mask)."""
    literals = AttentionLiterals(scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking)
    check_sinks(sinks, q, masking)
    launches = _plan(q, k, v, mask, literals)
    if launches is not None:
        out, stats, classes = plan.forward(launches, q, k, v, mask, seed)
        return out, stats if sinks is None else join_sinks(out, stats, sinks), classes
    ref, lse = reference_forward(q, k, v, mask, literals, _generator(seed, q.device), sinks)
    out = output_like(q, v.shape[3])
    out.copy_(ref)
    stats = torch.stack([lse * LOG2E, torch.zeros_like(lse)], dim=-1).float()
    return out, stats, q.new_empty(0, dtype=torch.int8)


attention_forward = torch.library.custom_op("fuser::attention_forward", _forward, mutates_args=())


@attention_forward.register_fake
def _(q, k, v, mask, sinks, *literals_and_seed):
    literals = AttentionLiterals(*literals_and_seed[:-1])
    plan.check_arguments(q, k, v, mask, literals.masking)
    check_sinks(sinks, q, literals.masking)
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    triton_mask = mask.expand(b, hq, lq, lk) if mask is not None and plan.kernels_support(
        q, k, v, mask, literals) else None
    classes = q.new_empty(class_map_shape(triton_mask, lq, lk), dtype=torch.int8)
    return output_like(q, v.shape[3]), q.new_empty(b, hq, lq, 2, dtype=torch.float32), classes


def _backward_grads(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, sinks: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor,
                    classes: torch.Tensor, seed: torch.Tensor | None, scale: float, causal: bool, window: int,
                    bottom_right: bool, softcap: float, dropout_p: float, mask_value: float, masking: str,
                    mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dS), dq/dk/dv laid out like q, k, v; with sinks, from the joined out and stats (sinks.py);
    dS the gradient of the scores a float mask is added to, [B, Hq, Lq, Lk] float32 with mask_grad, else empty."""
    literals = AttentionLiterals(scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking)
    launches = _plan(q, k, v, mask, literals)
    if launches is not None:
        return plan.backward(launches, grad_out, q, k, v, mask, out, stats, classes, seed, mask_grad)
    *grads, dscores = reference_backward(grad_out, q, k, v, mask, literals, _generator(seed, q.device), sinks,
                                         mask_grad=True)
    dscores = dscores.float() if mask_grad else q.new_empty(0, dtype=torch.float32)
    return (*(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads)), dscores)


attention_backward = torch.library.custom_op("fuser::attention_backward", _backward_grads, mutates_args=())
_call_backward = direct_call(attention_backward, _backward_grads)


@attention_backward.register_fake
def _(grad_out, q, k, v, *rest):
    mask_grad = rest[-1]
    dscores = q.new_empty((*q.shape[:3], k.shape[2]) if mask_grad else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dscores


def _setup_context(ctx, inputs, output):
    q, k, v, mask, sinks, *literals, seed = inputs
    out, stats, classes = output
    ctx.mark_non_differentiable(stats, classes)
    ctx.set_materialize_grads(False)  # no zero-filled gradient of the statistics per backward
    ctx.save_for_backward(q, k, v, mask, sinks, out, stats, classes, seed)
    ctx.literals = tuple(literals)


def _backward(ctx, grad_out, _grad_stats, _grad_classes):
    if grad_out is None:
        return (None,) * (len(ctx.literals) + 6)
    q, k, v, mask, sinks, out, stats, classes, seed = ctx.saved_tensors
    # the saved outputs enter as plain values: there is no double backward
    out, stats = out.detach(), stats.detach()
    mask_grad = mask is not None and mask.dtype.is_floating_point and ctx.needs_input_grad[3]
    dq, dk, dv, dscores = _call_backward(grad_out, q, k, v, mask, sinks, out, stats, classes, seed, *ctx.literals,
                                         mask_grad)
    dmask = dscores.sum_to_size(mask.shape).to(mask.dtype) if mask_grad else None
    dsinks = sinks_gradient(grad_out, out, stats, sinks) if sinks is not None and ctx.needs_input_grad[4] else None
    return dq, dk, dv, dmask, dsinks, *(None for _ in ctx.literals), None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
# under DTensor: sharded by batch or heads (q, k, v, out, statistics; the mask and its classes where they have it)
register_sharding(attention_forward._opoverload, BatchAndHeads(args=(0, 1, 2), broadcast=(3,), follows=(2,),
                                                               dropout=9))
register_sharding(attention_backward._opoverload, BatchAndHeads(args=(0, 1, 2, 3, 5, 6), broadcast=(4, 7),
                                                                follows=(), dropout=14))
_call_forward = direct_call(attention_forward, _forward, _setup_context, _backward)
