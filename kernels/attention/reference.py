"""The plain-torch attention formula: the CPU path of the ops and what the tests compare against.

It is the naive code the patterns replace, written once: scores, softcap, masks, softmax,
dropout, weighted sum, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)


def visible_positions(lq: int, lk: int, causal: bool, window: int, bottom_right: bool,
                      device: torch.device) -> torch.Tensor | None:
    """[Lq, Lk] bool: keys a query may see by position (None when every key is visible).

    Query i sits at position i + (Lk − Lq if bottom_right else 0), key j at j.
    """
    if not causal and window <= 0:
        return None
    q_pos = torch.arange(lq, device=device)[:, None] + (lk - lq if bottom_right else 0)
    k_pos = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window > 0:
        keep &= q_pos - k_pos < window
    return keep


def reference_forward(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in q's dtype, natural log-sum-exp of the scores [B, Hq, Lq] in the compute dtype)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    keep = visible_positions(q.shape[2], k.shape[2], causal, window, bottom_right, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            scores = scores + mask.to(compute)
    if keep is not None:
        scores = scores.masked_fill(~keep, mask_value)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=compute)
        probs = torch.where(uniform >= dropout_p, probs / (1 - dropout_p), 0.0)
    return (probs @ vf).to(q.dtype), lse


def attention_reference(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """`fuser::attention` in plain torch (same arguments); dropout draws from `generator`."""
    return reference_forward(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value,
                             generator)[0]
