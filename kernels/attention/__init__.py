"""`torch.ops.fuser.attention`: naive attention as one fused flash-attention op.

    attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int window,
              bool bottom_right, float softcap, float dropout_p, float mask_value, str masking="fill",
              Tensor? sinks=None) -> Tensor
    AttentionLiterals(scale, causal=True, ...).call(q, k, v, mask, sinks)  # the same call, literals by name

q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], any strides; query head h reads KV head
h // (Hq // Hkv). Output [B, Hq, Lq, Dv] in q's dtype (laid out [B, Lq, Hq, Dv] in memory when q
is a transposed view of that layout). It computes, in float32:
    s = q·k·scale; s = softcap·tanh(s/softcap) if softcap > 0; s += mask if float;
    excluded scores (bool mask False, causal: key after query, window: query − key ≥ window, query i at
    position i + (Lk − Lq if bottom_right else 0)) become mask_value ("fill") or s + mask_value ("add");
    p = softmax(s), with "sdpa" 0 on rows whose scores are all −inf; dropout(p); out = p·v.
With sinks [Hq] (GPT-OSS), each row's softmax has one more score, the sink of its head (unscaled, never
masked, no value): p = softmax([s, sink])[:-1]; the sinks get their gradient.
`masking` names the code replaced (reference.py): masked_fill / where ("fill"), an additive 0/fill
mask ("add"), F.scaled_dot_product_attention ("sdpa"). Fully masked rows follow that code: NaN
with mask_value −inf, the average of V over all keys with a finite fill, a softmax over score + fill
for "add", zeros for "sdpa" (and their gradients: see backward.py). Scores below −FLT_MAX/log2(e)
(≈ −2.4e38: finfo(float32/bfloat16).min fills) count as equal, as they do in float64 once a score is
added to them. Gradients flow to q, k, v, the sinks and a float mask that requires grad (a learned bias: dS
where it passes, from the dQ kernel, summed over the dims the mask broadcasts on), never to a bool mask.
Dropout draws its own Philox stream (not torch's) from a seed tensor; the backward regenerates the same
keep-mask, and the reference computes the same stream in torch (reference.philox_uniform).
NaN and ±inf: a value at a position a row cannot see never reaches that row (reference.py).
The kernels take what `LIMITS` says; anything else (and CPU without TRITON_INTERPRET=1) runs
`attention_reference` and its explicit backward.

Ops (kernels/runtime/ops.py, the fused-op recipe): `attention` is CompositeImplicitAutograd: it draws
the dropout seed as a tensor on q's device (the kernels read it there: no host sync) and calls
`attention_forward` -> (out, row statistics, tile classes), whose autograd calls `attention_backward`.
Both are fused ops: fake, reference, direct eager calls, and traced for Inductor on CUDA their launches
(plan.py, planned at trace time). Their Python signatures below are their schemas.

Reading order: plan.py (what a call means in kernel terms, and its launches), forward.py, backward.py,
tiles.py (what they share), reference.py (the formula they compute).
"""
from __future__ import annotations

import torch

from ..runtime import BatchAndHeads, fused_op, register_sharding
from . import plan
from .forward import output_like
from .plan import LIMITS, AttentionLimits
from .reference import LOG2E, AttentionLiterals, attention_reference, reference_backward, reference_forward
from .tiles import class_map_shape

__all__ = ["LIMITS", "AttentionLimits", "AttentionLiterals", "attention_reference"]

_LIBRARY = torch.library.Library("fuser", "FRAGMENT")
_LIBRARY.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int window, "
                "bool bottom_right, float softcap, float dropout_p, float mask_value, str masking=\"fill\", "
                "Tensor? sinks=None) -> Tensor")


def _attention(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking="fill",
               sinks=None):
    literals = AttentionLiterals(scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking)
    seed = torch.randint(2**31 - 1, (), dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    return _call_forward(q, k, v, mask, *literals, seed, sinks)[0]


_LIBRARY.impl("attention", _attention, "CompositeImplicitAutograd")


def _plan(q, k, v, mask, literals, sinks) -> plan.Plan | None:
    """The launch plan of this call, cached per signature; None where the reference runs."""
    literals = AttentionLiterals(*literals)
    return plan.plan_for(plan.signature(q, k, v, mask, sinks, literals=literals),
                         lambda: plan.build_plan(q, k, v, mask, literals, sinks))


# forward: (q, k, v, mask, *literals, seed, sinks)

def _forward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    causal: bool, window: int, bottom_right: bool, softcap: float, dropout_p: float,
                    mask_value: float, masking: str, seed: torch.Tensor | None, sinks: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, row statistics [B, Hq, Lq, 2] float32 whose sum is the log2-sum-exp of the scores, sinks included
    (+inf on rows "sdpa" zeroes), tile classes of the mask)."""
    literals = (scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking)
    return plan.forward(_plan(q, k, v, mask, literals, sinks), q, k, v, mask, seed, sinks)


def _forward_reference(q, k, v, mask, *literals_seed_sinks):
    *literals, seed, sinks = literals_seed_sinks
    ref, lse = reference_forward(q, k, v, mask, AttentionLiterals(*literals), seed, sinks)
    out = output_like(q, v.shape[3])
    out.copy_(ref)
    stats = torch.stack([lse * LOG2E, torch.zeros_like(lse)], dim=-1).float()
    return out, stats, q.new_empty(0, dtype=torch.int8)


def _forward_runs_kernels(q, k, v, mask, *literals_seed_sinks):
    return _plan(q, k, v, mask, literals_seed_sinks[:-2], literals_seed_sinks[-1]) is not None


def _forward_fake(q, k, v, mask, *literals_seed_sinks):
    literals, sinks = AttentionLiterals(*literals_seed_sinks[:-2]), literals_seed_sinks[-1]
    plan.check_arguments(q, k, v, mask, literals.masking, sinks)
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    read = mask is not None and plan.kernels_support(q, k, v, mask, literals, sinks)
    strides = plan.broadcast_strides(mask, (b, hq, lq, lk)) if read else None
    classes = q.new_empty(class_map_shape(strides, (b, hq), lq, lk), dtype=torch.int8)
    return output_like(q, v.shape[3]), q.new_empty(b, hq, lq, 2, dtype=torch.float32), classes


# backward: (grad_out, q, k, v, mask, out, stats, classes, seed, *literals, sinks, mask_grad)

def _backward_kernel(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor, classes: torch.Tensor,
                     seed: torch.Tensor | None, scale: float, causal: bool, window: int, bottom_right: bool,
                     softcap: float, dropout_p: float, mask_value: float, masking: str, sinks: torch.Tensor | None,
                     mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks, dmask), laid out like q, k, v, sinks; dmask in the mask's shape and dtype (contiguous).
    dsinks is empty without sinks, dmask without mask_grad (a float mask whose gradient is asked for)."""
    literals = (scale, causal, window, bottom_right, softcap, dropout_p, mask_value, masking)
    return plan.backward(_plan(q, k, v, mask, literals, sinks), grad_out, q, k, v, mask, out, stats, classes, seed,
                         sinks, mask_grad)


def _backward_reference(grad_out, q, k, v, mask, out, stats, classes, seed, *literals_sinks_mask_grad):
    *literals, sinks, mask_grad = literals_sinks_mask_grad
    *grads, dsinks, dmask = reference_backward(grad_out, q, k, v, mask, AttentionLiterals(*literals), seed, sinks,
                                               mask_grad)
    absent = q.new_empty(0, dtype=torch.float32)
    return (*(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads)), absent if sinks is None else dsinks,
            absent if dmask is None else dmask.contiguous())


def _backward_runs_kernels(grad_out, q, k, v, mask, out, stats, classes, seed, *literals_sinks_mask_grad):
    return _plan(q, k, v, mask, literals_sinks_mask_grad[:-2], literals_sinks_mask_grad[-2]) is not None


def _backward_fake(grad_out, q, k, v, mask, *arguments):
    sinks, mask_grad = arguments[-2:]
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks, dmask


_call_backward = fused_op("attention_backward", _backward_kernel, _backward_reference, _backward_fake,
                          _backward_runs_kernels,
                          symbolic=lambda grad_out, q, k, v, mask, *_: plan.symbolic_ok(q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, *literals, seed, sinks = inputs
    out, stats, classes = output
    ctx.mark_non_differentiable(stats, classes)
    ctx.set_materialize_grads(False)  # no zero-filled gradient of the statistics per backward
    ctx.save_for_backward(q, k, v, mask, out, stats, classes, seed, sinks)
    ctx.literals = tuple(literals)


def _backward(ctx, grad_out, _grad_stats, _grad_classes):
    if grad_out is None:
        return (None,) * (len(ctx.literals) + 6)
    q, k, v, mask, out, stats, classes, seed, sinks = ctx.saved_tensors
    mask_grad = mask is not None and mask.dtype.is_floating_point and ctx.needs_input_grad[3]
    # the saved outputs enter as plain values: there is no double backward
    dq, dk, dv, dsinks, dmask = _call_backward(grad_out, q, k, v, mask, out.detach(), stats.detach(), classes, seed,
                                               *ctx.literals, sinks, mask_grad)
    return (dq, dk, dv, dmask if mask_grad else None, *(None for _ in ctx.literals), None,
            dsinks if sinks is not None else None)


_call_forward = fused_op("attention_forward", _forward_kernel, _forward_reference, _forward_fake,
                         _forward_runs_kernels, setup_context=_setup_context, backward=_backward,
                         symbolic=lambda q, k, v, mask, *_: plan.symbolic_ok(q, k, v))
# under DTensor: sharded by batch or heads (q, k, v, out, statistics; the mask and its classes where they have
# the dim, the mask's gradient so too, else a partial sum); with dropout or sinks replicated. Backward arguments:
# 0 grad_out, 1-3 q k v, 4 mask, 5 out, 6 stats, 7 classes, 8 seed, 9-16 literals (14 dropout_p), 17 sinks,
# 18 mask_grad; outputs 0-2 dq dk dv, 3 dsinks, 4 dmask
register_sharding(torch.ops.fuser.attention_forward.default, BatchAndHeads(
    args=(0, 1, 2), broadcast=(3,), follows=(2,), unsharded_with=(9, 13)))
register_sharding(torch.ops.fuser.attention_backward.default, BatchAndHeads(
    args=(0, 1, 2, 3, 5, 6), broadcast=(4, 7), follows=(), unsharded_with=(14, 17), replicated=(3,), summed=(4,),
    summed_when=18))
