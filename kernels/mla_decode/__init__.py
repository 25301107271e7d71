"""`torch.ops.fuser.mla_decode`: multi-head latent attention (DeepSeek-V2/V3) decoded in the latent space.

    o_lat = torch.ops.fuser.mla_decode(q_lat, q_pe, c, k_pe, scale)

The absorbed form of MLA: W_UK folded into the query (q_lat = q_nope·W_UK, [B, Lq, H, kv_lora_rank]), the rotary
part q_pe [B, Lq, H, rope] as it is, attending over the latent cache itself — c [B, Lctx, kv_lora_rank] (both
key and value) and k_pe [B, Lctx, rope], one shared "KV head" — so that nothing is expanded per head; the caller
applies W_UV to o_lat [B, Lq, H, kv_lora_rank]. Causal with any number of new tokens: new token t sees context
positions ≤ Lctx − Lq + t (the new tokens are the cache's last Lq). Any strides; bf16 / fp16 / fp32 in, float32
scores, softmax and accumulation, output in q_lat's dtype. What it computes: reference.py; how: decode.py.
Calls outside `LIMITS`, float64 and CPU tensors without TRITON_INTERPRET=1 run the reference.

Autograd: decode is inference, but the op has an exact gradient to all four tensors (not to the scale): its
backward is the reference formula written out in plain torch (`mla_decode_backward_reference`, float32
inside), O(B·Lq·H·Lctx) memory, not a Triton kernel — correct, not fast; training uses the expanded form
(`fuser::attention`), which is the faster one at prefill lengths anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime import KernelLimits, entry_op, fused_op, kernels_apply
from .decode import DecodeTiling, decode_tiling, mla_decode_launch
from .reference import mla_decode_backward_reference, mla_decode_reference

__all__ = ["LIMITS", "DecodeTiling", "decode_tiling", "mla_decode", "mla_decode_launch", "mla_decode_reference",
           "mla_decode_backward_reference", "latent_is_cheaper"]


@dataclass(frozen=True)
class MLADecodeLimits(KernelLimits):
    """One dtype for the four tensors; the latent (c's width) and rotary widths the kernel's registers take
    (V3: 512 and 64)."""
    max_latent_dim: int = 512
    max_rope_dim: int = 128


LIMITS = MLADecodeLimits()


def latent_is_cheaper(new_tokens: int, context: int, latent: int, rope: int, nope: int, v: int) -> bool:
    """Whether Lq new tokens attending a context of `context` keys (the new ones included, causal bottom-right)
    cost fewer FLOPs absorbed than expanded; memory traffic favours the absorbed form at every length, so this
    is the rule that keeps prefill (no context before the new tokens) expanded on fuser::attention.
    Per head: expanded = context·R·(nope + v) (kv_b_proj over the cache) + pairs·(nope + rope + v);
    absorbed = Lq·R·(nope + v) (W_UK, W_UV per new token) + pairs·(2R + rope), pairs = visible (query, key)
    pairs. DeepSeek-V3 (R 512, nope = v = 128): absorbed while Lq ≲ 170 after a long context."""
    if not 0 < new_tokens <= context:
        return False
    pairs = new_tokens * context - new_tokens * (new_tokens - 1) // 2
    expanded = context * latent * (nope + v) + pairs * (nope + rope + v)
    absorbed = new_tokens * latent * (nope + v) + pairs * (2 * latent + rope)
    return (0 < new_tokens) & (new_tokens <= context) & (absorbed < expanded)


def check_arguments(q_lat, q_pe, c, k_pe) -> None:
    """Raise a ValueError naming what does not fit [B, Lq, H, R], [B, Lq, H, P], [B, Lctx, R], [B, Lctx, P]."""
    shapes = f"q_lat {list(q_lat.shape)}, q_pe {list(q_pe.shape)}, c {list(c.shape)}, k_pe {list(k_pe.shape)}"
    if q_lat.dim() != 4 or q_pe.dim() != 4 or c.dim() != 3 or k_pe.dim() != 3:
        raise ValueError(f"mla_decode takes q_lat [B, Lq, H, R], q_pe [B, Lq, H, P], c [B, Lctx, R], "
                         f"k_pe [B, Lctx, P]; got {shapes}")
    batch, new_tokens, heads, latent = q_lat.shape
    if (tuple(q_pe.shape[:3]) != (batch, new_tokens, heads) or tuple(c.shape) != (batch, c.shape[1], latent)
            or tuple(k_pe.shape) != (batch, c.shape[1], q_pe.shape[3])):
        raise ValueError(f"mla_decode shapes do not fit: {shapes}")
    if c.shape[1] < new_tokens:
        raise ValueError(f"mla_decode: the context ({c.shape[1]}) must hold the {new_tokens} new tokens")
    if len({q_lat.dtype, q_pe.dtype, c.dtype, k_pe.dtype}) != 1:
        raise ValueError(f"mla_decode takes one dtype for its four tensors; got {q_lat.dtype}, {q_pe.dtype}, "
                         f"{c.dtype}, {k_pe.dtype}")


def kernels_support(q_lat, q_pe, c, k_pe) -> bool:
    return (kernels_apply(q_lat, q_pe, c, k_pe) and q_lat.shape[3] <= LIMITS.max_latent_dim
            and q_pe.shape[3] <= LIMITS.max_rope_dim and q_lat.numel() > 0 and c.shape[1] > 0)


# The ops (kernels/runtime/ops.py): fuser::mla_decode over fuser::mla_decode_forward, fuser::mla_decode_backward

def _backward_formula(grad_out: torch.Tensor, q_lat: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor,
                      k_pe: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d q_lat, d q_pe, d c, d k_pe): the reference's formula on every device (see the module docstring)."""
    return tuple(g.contiguous() for g in mla_decode_backward_reference(grad_out, q_lat, q_pe, c, k_pe, scale))


def _backward_fake(grad_out, q_lat, q_pe, c, k_pe, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q_lat, q_pe, c, k_pe))


_call_backward = fused_op("mla_decode_backward", _backward_formula, _backward_formula, _backward_fake,
                          lambda *args: True)  # plain torch: traced for Inductor it compiles as any torch code


def _forward_kernel(q_lat: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
                    scale: float) -> torch.Tensor:
    return mla_decode_launch(q_lat, q_pe, c, k_pe, scale)


def _forward_reference(q_lat, q_pe, c, k_pe, scale):
    check_arguments(q_lat, q_pe, c, k_pe)
    return mla_decode_reference(q_lat, q_pe, c, k_pe, scale).contiguous()


def _forward_fake(q_lat, q_pe, c, k_pe, scale):
    check_arguments(q_lat, q_pe, c, k_pe)
    return q_lat.new_empty(q_lat.shape)


def _setup_context(ctx, inputs, output):
    q_lat, q_pe, c, k_pe, scale = inputs
    ctx.save_for_backward(q_lat, q_pe, c, k_pe)
    ctx.scale = scale


def _backward(ctx, grad_out):
    return (*_call_backward(grad_out, *ctx.saved_tensors, ctx.scale), None)


_call_forward = fused_op("mla_decode_forward", _forward_kernel, _forward_reference, _forward_fake,
                         lambda q_lat, q_pe, c, k_pe, scale: kernels_support(q_lat, q_pe, c, k_pe),
                         setup_context=_setup_context, backward=_backward)


@entry_op
def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Absorbed MLA attention over the latent cache; see the module docstring."""
    check_arguments(q_lat, q_pe, c, k_pe)
    return _call_forward(q_lat, q_pe, c, k_pe, scale)
