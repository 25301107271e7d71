"""What `fuser::mla_decode` computes, in plain torch: attention of absorbed queries over the latent cache.

    s[b, t, h, j] = (q_lat[b, t, h] · c[b, j] + q_pe[b, t, h] · k_pe[b, j]) · scale   for j ≤ Lctx − Lq + t
    o_lat[b, t, h] = Σ_j softmax_j(s[b, t, h]) · c[b, j]

New token t of Lq sits at position Lctx − Lq + t of the context (causal, bottom-right: the new tokens are the
cache's last Lq entries). Float32 inside (float64 for float64 inputs), one rounding to q_lat's dtype. The
backward below is the same formula's exact gradient, written out (no autograd inside the op).
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def visible(new_tokens: int, context: int, device: torch.device) -> torch.Tensor:
    """[Lq, Lctx] bool: new token t sees context position j ≤ Lctx − Lq + t."""
    last = torch.arange(context - new_tokens, context, device=device)
    return torch.arange(context, device=device)[None, :] <= last[:, None]


def _probabilities(q_lat, q_pe, c, k_pe, scale, dtype):
    """softmax of the scores [B, Lq, H, Lctx] in `dtype`."""
    scores = (torch.einsum("bthr,bjr->bthj", q_lat.to(dtype), c.to(dtype))
              + torch.einsum("bthp,bjp->bthj", q_pe.to(dtype), k_pe.to(dtype))) * scale
    seen = visible(q_lat.shape[1], c.shape[1], c.device)[None, :, None, :]
    return torch.softmax(scores.masked_fill(~seen, float("-inf")), -1)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """o_lat [B, Lq, H, R] in q_lat's dtype (see the module docstring)."""
    dtype = compute_dtype(q_lat, q_pe, c, k_pe)
    p = _probabilities(q_lat, q_pe, c, k_pe, scale, dtype)
    return torch.einsum("bthj,bjr->bthr", p, c.to(dtype)).to(q_lat.dtype)


def mla_decode_backward_reference(grad_out: torch.Tensor, q_lat: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor,
                                  k_pe: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """(d q_lat, d q_pe, d c, d k_pe), each in its input's dtype: ds = p ⊙ (do·cᵀ − Σ do ⊙ o); c is both key
    and value, so dc takes the value's pᵀ·do and the key's scale·dsᵀ·q_lat."""
    dtype = compute_dtype(q_lat, q_pe, c, k_pe)
    p = _probabilities(q_lat, q_pe, c, k_pe, scale, dtype)
    c64, do = c.to(dtype), grad_out.to(dtype)
    out = torch.einsum("bthj,bjr->bthr", p, c64)
    dp = torch.einsum("bthr,bjr->bthj", do, c64)
    ds = p * (dp - (do * out).sum(-1, keepdim=True)) * scale
    d_q_lat = torch.einsum("bthj,bjr->bthr", ds, c64)
    d_q_pe = torch.einsum("bthj,bjp->bthp", ds, k_pe.to(dtype))
    d_c = torch.einsum("bthj,bthr->bjr", ds, q_lat.to(dtype)) + torch.einsum("bthj,bthr->bjr", p, do)
    d_k_pe = torch.einsum("bthj,bthp->bjp", ds, q_pe.to(dtype))
    return d_q_lat.to(q_lat.dtype), d_q_pe.to(q_pe.dtype), d_c.to(c.dtype), d_k_pe.to(k_pe.dtype)
