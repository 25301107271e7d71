"""Attention sinks: one more logit per row (a learned one per head in gpt-oss) that joins the softmax's
denominator and carries no value:  out' = Σ_j e^{s_j} v_j / (Σ_j e^{s_j} + e^{σ}).

The kernels compute attention without it; joining it afterwards is exact. With lse = log Σ_j e^{s_j} and
lse' = log(e^{lse} + e^{σ}), out' = out · e^{lse − lse'}. The plain backward run on out' and lse' is the sink
attention's backward (its probabilities e^{s_j − lse'} are the sink attention's, and Δ = rowsum(dO ∘ out')),
and the sinks' own gradient is dσ = −Σ_rows e^{σ − lse'} · rowsum(dO ∘ out'), summed to the sinks' shape.
A row that sees no key (lse = −inf, or an open row whose hidden keys carry e^{−huge}) gives zeros: its whole
weight is on the sink, as in the naive code.
"""
from __future__ import annotations

import torch

from .reference import LOG2E


def check_sinks(sinks: torch.Tensor | None, q: torch.Tensor, masking: str) -> None:
    """Sinks are floating, broadcast to [B, Hq, Lq], and meet the masked softmax ("fill" / "add") only."""
    if sinks is None:
        return
    if not sinks.dtype.is_floating_point:
        raise ValueError(f"attention sinks must be floating, not {sinks.dtype}")
    if masking == "sdpa":
        raise ValueError('attention sinks do not combine with masking "sdpa" (SDPA takes no sinks)')
    torch.broadcast_shapes(sinks.shape, q.shape[:3])
    if sinks.dim() > 3:
        raise ValueError(f"attention sinks of shape {tuple(sinks.shape)} do not broadcast to [B, Hq, Lq]")


def _sinks_log2(sinks: torch.Tensor, rows: torch.Size) -> torch.Tensor:
    return sinks.float().expand(rows) * LOG2E


def join_sinks(out: torch.Tensor, stats: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Join the sinks into a forward's (out, stats) in place (out keeps its layout); returns the joined stats,
    [lse', 0] in log2 units, which the backward then reads."""
    lse = stats.sum(-1)
    joined = torch.logaddexp2(lse, _sinks_log2(sinks, lse.shape))
    weight = torch.exp2(lse - joined)[..., None]
    out.copy_(torch.where(weight == 0, 0.0, out.float() * weight))
    return torch.stack([joined, torch.zeros_like(joined)], dim=-1)


def sinks_gradient(grad_out: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, sinks: torch.Tensor
                   ) -> torch.Tensor:
    """dσ from the joined out and stats, in the sinks' shape and dtype."""
    lse = stats.sum(-1)
    sink_probability = torch.exp2(_sinks_log2(sinks, lse.shape) - lse)
    delta = (grad_out.float() * out.float()).sum(-1)
    return (-(sink_probability * delta)).sum_to_size(sinks.shape).to(sinks.dtype)
