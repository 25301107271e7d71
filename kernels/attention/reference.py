"""The plain-torch attention formula: the CPU path of the ops and what the tests compare against.

It is the naive code the patterns replace, written once: scores, softcap, masks, softmax,
dropout, weighted sum, in float32 (float64 for float64 inputs). `masking` says which code that
was, as excluded scores and fully masked rows differ between them:
- "fill": `masked_fill` / `where` / a bool mask: excluded scores become mask_value, no gradient
  reaches them (a fully masked row: NaN with −inf, the average of V with a finite fill);
- "add": an additive mask of 0 and mask_value: excluded scores get mask_value added, their
  gradient passes (a fully masked row with a finite fill is a softmax over score + fill);
- "sdpa": `F.scaled_dot_product_attention`: as "fill", and a row whose scores are all −inf
  gives zeros and no gradient (its safe softmax).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG2E = 1.0 / math.log(2.0)
MASKINGS = ("fill", "add", "sdpa")


class AttentionLiterals(NamedTuple):
    """The literals of `fuser::attention` by name, in the op's schema order (`*literals` spreads them so)."""
    scale: float
    causal: bool = False
    window: int = 0
    bottom_right: bool = False
    softcap: float = 0.0
    dropout_p: float = 0.0
    mask_value: float = -math.inf
    masking: str = "fill"

    def call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`torch.ops.fuser.attention(q, k, v, mask, ...)` with these literals."""
        return torch.ops.fuser.attention(q, k, v, mask, *self)


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


def _softmax(scores, zero_empty_rows: bool):
    """(softmax, natural lse) over the last dim. With zero_empty_rows, a row whose scores are all −inf
    gets probabilities 0, no gradient, and lse +inf (probabilities recomputed from it are then 0, as
    from the kernels' statistics)."""
    if not zero_empty_rows:
        return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)
    empty = (scores == -math.inf).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    return (torch.softmax(scores, dim=-1).masked_fill(empty, 0.0),
            torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], math.inf))


def _probabilities(q, k, mask, literals: AttentionLiterals):
    """(softmax probabilities, natural lse, kept scores where the others pass no gradient (None: all
    pass), tanh of the softcapped scores or None) with K repeated over the query heads, in the compute dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(compute).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.to(compute) @ kf.transpose(-1, -2) * literals.scale
    tanh = None
    if literals.softcap > 0:
        tanh = torch.tanh(scores / literals.softcap)
        scores = literals.softcap * tanh
    keep = visible_positions(q.shape[2], k.shape[2], literals.causal, literals.window, literals.bottom_right,
                             q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            scores = scores + mask.to(compute)
    adds = literals.masking == "add"
    if keep is not None:
        fill = literals.mask_value
        scores = torch.where(keep, scores, scores + fill) if adds else scores.masked_fill(~keep, fill)
    probs, lse = _softmax(scores, zero_empty_rows=literals.masking == "sdpa")
    return probs, lse, None if adds else keep, tanh


def _dropout_scale(probs, dropout_p, generator):
    """The factor dropout multiplies the probabilities by (keep / (1 − p)), or None."""
    if dropout_p <= 0:
        return None
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return (uniform >= dropout_p).to(probs.dtype) / (1 - dropout_p)


def reference_forward(q, k, v, mask, literals: AttentionLiterals, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in q's dtype, natural log-sum-exp of the scores [B, Hq, Lq] in the compute dtype)."""
    probs, lse, _, _ = _probabilities(q, k, mask, literals)
    dropout = _dropout_scale(probs, literals.dropout_p, generator)
    if dropout is not None:
        probs = probs * dropout
    vf = v.to(probs.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (probs @ vf).to(q.dtype), lse


def reference_backward(grad_out, q, k, v, mask, literals: AttentionLiterals,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the formula, as autograd of the naive code gives them: masked_fill passes no
    gradient to excluded scores (not even NaN), an added mask passes it."""
    group = q.shape[1] // k.shape[1]
    probs, _, keep, tanh = _probabilities(q, k, mask, literals)
    compute = probs.dtype
    dropout = _dropout_scale(probs, literals.dropout_p, generator)
    do = grad_out.to(compute)
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    dropped = probs if dropout is None else probs * dropout
    dv = dropped.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    if dropout is not None:
        dp = dp * dropout
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    if keep is not None:
        ds = ds.masked_fill(~keep, 0.0)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dq = ds @ kf * literals.scale
    dk = ds.transpose(-1, -2) @ qf * literals.scale

    def per_kv_head(x):
        return x.unflatten(1, (k.shape[1], group)).sum(2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def attention_reference(q, k, v, mask, *literals, generator: torch.Generator | None = None) -> torch.Tensor:
    """`fuser::attention` in plain torch (the op's arguments); dropout draws from `generator`."""
    return reference_forward(q, k, v, mask, AttentionLiterals(*literals), generator)[0]
