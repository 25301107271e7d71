"""`torch.ops.fuser.gated_delta_rule`: linear attention with the gated delta rule, fused.

    out, final_state = torch.ops.fuser.gated_delta_rule(q, k, v, g, beta, initial_state, scale, l2norm)

q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (Hv a multiple of Hk), g and beta [B, T, Hv], initial_state
[B, Hv, Dk, Dv] or None; any strides. out [B, T, Hv, Dv] in q's dtype, final_state float32 (float64 for
float64 inputs). What it computes, and in which precision: reference.py (transformers' semantics).
Calls of up to `RECURRENT_MAX_TOKENS` tokens (decode) run the recurrent kernel (recurrent.py), longer
ones the chunkwise kernels (chunk.py); the backward is chunkwise at every length (backward.py: it
recomputes the forward's intermediates). Float64 inputs, CPU tensors without TRITON_INTERPRET=1 and
anything outside `LIMITS` run the chunkwise reference forward and, backward, its autograd in float64
a segment of chunks at a time (reference.backward_reference).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..runtime import KERNEL_DTYPES, kernels_apply
from .backward import chunk_backward
from .chunk import chunk_forward, chunk_size
from .recurrent import recurrent_forward
from .reference import L2NORM_EPS, backward_reference, chunked_reference, compute_dtype, recurrent_reference

__all__ = ["LIMITS", "RECURRENT_MAX_TOKENS", "chunked_reference", "gated_delta_rule", "recurrent_reference"]

RECURRENT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Limits:
    """What the kernels compute: these dtypes, head dims up to `max_head_dim`, one decay per head and token."""
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int


LIMITS = Limits(dtypes=KERNEL_DTYPES, max_head_dim=256)


def check_arguments(q, k, v, g, beta, initial_state) -> None:
    """Raise a ValueError naming the argument whose shape the op does not take."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gated_delta_rule takes q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv]; got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    batch, length, heads_k, dk = k.shape
    heads, dv = v.shape[2:]
    if heads % heads_k:
        raise ValueError(f"value heads ({heads}) must be a multiple of key heads ({heads_k})")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (batch, length, heads):
            raise ValueError(f"{name} must be [B, T, Hv] = {[batch, length, heads]} (one decay per head and token); "
                             f"got {list(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, dk, dv):
        raise ValueError(f"initial_state must be [B, Hv, Dk, Dv] = {[batch, heads, dk, dv]}; "
                         f"got {list(initial_state.shape)}")


def kernels_support(q, k, v, g, beta, initial_state) -> bool:
    return kernels_apply(q, k, v, g, beta, initial_state) and max(k.shape[3], v.shape[3]) <= LIMITS.max_head_dim


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` with a contiguous last dim (the kernels' one layout requirement)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("fuser::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: torch.Tensor | None, scale: float, l2norm: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, final state); see the module docstring."""
    check_arguments(q, k, v, g, beta, initial_state)
    if not kernels_support(q, k, v, g, beta, initial_state):
        out, final = chunked_reference(q, k, v, g, beta, initial_state, scale, l2norm, chunk_size(k.shape[3]))
        return out.contiguous(), final
    batch, length, _, dk = k.shape
    heads, dv = v.shape[2:]
    out = torch.empty(batch, length, heads, dv, dtype=q.dtype, device=q.device)
    final = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=q.device)
    initial = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    forward = recurrent_forward if length <= RECURRENT_MAX_TOKENS else chunk_forward
    forward(_rows(q), _rows(k), _rows(v), g, beta, initial, scale, l2norm, L2NORM_EPS, out, final)
    return out, final


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state, scale, l2norm):
    check_arguments(q, k, v, g, beta, initial_state)
    batch, length, _, dk = k.shape
    heads, dv = v.shape[2:]
    final_dtype = compute_dtype(q, k, v, g, beta, initial_state)
    return q.new_empty(batch, length, heads, dv), q.new_empty(batch, heads, dk, dv, dtype=final_dtype)


@contextlib.contextmanager
def _autograd_inside_the_op():
    """Autograd recording again inside a custom op's implementation, which the dispatcher runs with the
    autograd keys excluded (the recomputing backward differentiates through the reference)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(keys.AutogradFunctionality).remove(
        keys.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("fuser::gated_delta_rule_backward", mutates_args=())
def gated_delta_rule_backward(grad_out: torch.Tensor | None, grad_state: torch.Tensor | None, q: torch.Tensor,
                              k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                              initial_state: torch.Tensor | None, scale: float, l2norm: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """(dq, dk, dv, dg, dbeta, dinitial_state), the last empty without an initial state."""
    if kernels_support(q, k, v, g, beta, initial_state):
        initial = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        grads = chunk_backward(grad_out, grad_state, _rows(q), _rows(k), _rows(v), g, beta, initial, scale, l2norm,
                               L2NORM_EPS)
    else:
        with _autograd_inside_the_op():
            grads = backward_reference(grad_out, grad_state, q, k, v, g, beta, initial_state, scale, l2norm,
                                       chunk_size(k.shape[3]))
    inputs = (q, k, v, g, beta, initial_state)
    return tuple(q.new_empty(0) if x is None else grad.to(x.dtype) for grad, x in zip(grads, inputs))


@gated_delta_rule_backward.register_fake
def _(grad_out, grad_state, q, k, v, g, beta, initial_state, scale, l2norm):
    initial = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return (*(torch.empty_like(x) for x in (q, k, v, g, beta)), initial)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, scale, l2norm = inputs
    ctx.set_materialize_grads(False)  # a final state nobody reads has no gradient to recompute
    ctx.save_for_backward(q, k, v, g, beta, initial_state)
    ctx.scale, ctx.l2norm = scale, l2norm


def _backward(ctx, grad_out, grad_state):
    q, k, v, g, beta, initial_state = ctx.saved_tensors
    if grad_out is None and grad_state is None:
        return (None,) * 8
    *grads, grad_initial = torch.ops.fuser.gated_delta_rule_backward(grad_out, grad_state, q, k, v, g, beta,
                                                                     initial_state, ctx.scale, ctx.l2norm)
    return (*grads, None if initial_state is None else grad_initial, None, None)


gated_delta_rule.register_autograd(_backward, setup_context=_setup_context)
