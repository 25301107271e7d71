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

NaN and ±inf follow one rule, whatever the tiling: a value at a position a row cannot see never
reaches that row; what it can see propagates as in the naive code. A position is hidden from a row
when excluded (position, a False bool) or when a float mask there is ≤ −FLT_MAX/log2 e (finfo.min,
−inf). Its probability is then exactly zero and no product with it is formed: not in p·V, dP = dO·Vᵀ,
dS·K, dSᵀ·Q or pᵀ·dO (a matmul would give 0·NaN = NaN). The exception are open rows, whose log-sum-exp
of the scores as the code forms them (log2 units) is at or below `saturation_lse`: there the hidden
positions may carry weight (fully masked rows: the average of V with a finite fill), and every position
reaches them, as in the naive code (NaN: not open). A row that reaches nothing gives NaN (SDPA: zeros)
and no gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG2E = 1.0 / math.log(2.0)
FLT_MAX = torch.finfo(torch.float32).max
MASKINGS = ("fill", "add", "sdpa")
SATURATION_MARGIN = 160.0  # 2^-160 is zero in float32


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

    def call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
             sinks: torch.Tensor | None = None) -> torch.Tensor:
        """`torch.ops.fuser.attention(q, k, v, mask, ..., sinks=sinks)` with these literals."""
        return torch.ops.fuser.attention(q, k, v, mask, *self, sinks=sinks)


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


def log2_units(value: float) -> float:
    """A score in log2 units, clamped like the kernels clamp mask values (−inf stays)."""
    if value == -math.inf:
        return value
    return min(max(value * LOG2E, -FLT_MAX), FLT_MAX)


def saturation_lse(mask_value: float, masking: str) -> float:
    """The log-sum-exp (log2 units) at or below which a row is open: hidden scores may carry weight there.

    A hidden score is at most skipped_bound = max(mask_value, −FLT_MAX) in log2 units, or score + skipped_bound
    with "add": there half the bound is used, exact while scores stay below half its size (a large negative
    fill is what the patterns pass). The kernels skip tiles exactly where this rule makes them weigh nothing.
    """
    skipped_bound = max(log2_units(mask_value), -FLT_MAX)
    if masking == "add":
        return max(skipped_bound + SATURATION_MARGIN, skipped_bound / 2)
    return skipped_bound + SATURATION_MARGIN


def _softmax(scores, zero_empty_rows: bool):
    """(softmax, natural lse, rows it zeroes or None) over the last dim. With zero_empty_rows, a row whose
    scores are all −inf gets probabilities 0, no gradient, and lse +inf (probabilities recomputed from it are
    then 0, as from the kernels' statistics)."""
    if not zero_empty_rows:
        return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1), None
    empty = (scores == -math.inf).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    return (torch.softmax(scores, dim=-1).masked_fill(empty, 0.0),
            torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], math.inf), empty)


def _probabilities(q, k, mask, literals: AttentionLiterals, sinks=None):
    """(softmax probabilities, natural lse, reach, passes, tanh of the softcapped scores or None) with K repeated
    over the query heads, in the compute dtype. `reach` (None: everywhere) holds the positions whose values reach
    each row (their probabilities are exactly zero elsewhere), `passes` (None: everywhere) those whose scores get
    a gradient: reached and, but with "add", not replaced. `sinks` (broadcast to [B, Hq, Lq]) join the softmax
    as one more score per row that carries no value (gpt-oss); the lse includes them."""
    compute = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(compute).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.to(compute) @ kf.transpose(-1, -2) * literals.scale
    tanh = None
    if literals.softcap > 0:
        tanh = torch.tanh(scores / literals.softcap)
        scores = literals.softcap * tanh
    shown = visible_positions(q.shape[2], k.shape[2], literals.causal, literals.window, literals.bottom_right,
                              q.device)
    visible = shown
    if mask is not None:
        if mask.dtype == torch.bool:
            shown = mask if shown is None else shown & mask
            visible = shown
        else:
            added = mask.to(compute)
            scores = scores + added
            seen = ~(added * LOG2E <= -FLT_MAX)  # as the kernels' tile classes: a NaN is seen
            visible = seen if visible is None else visible & seen
    adds = literals.masking == "add"
    if shown is not None:
        fill = literals.mask_value
        scores = torch.where(shown, scores, scores + fill) if adds else scores.masked_fill(~shown, fill)
    if sinks is not None:  # a last column, always visible, dropped after the softmax
        sink_column = sinks.to(compute).expand(scores.shape[:-1])[..., None]
        scores = torch.cat([scores, sink_column], dim=-1)
        shown, visible = (None if m is None else torch.cat([m.expand(*scores.shape[:-1], scores.shape[-1] - 1),
                                                             torch.ones_like(sink_column, dtype=torch.bool)], -1)
                          for m in (shown, visible))
    reach = None
    if visible is not None:
        open_rows = torch.logsumexp(scores, dim=-1, keepdim=True) * LOG2E <= saturation_lse(literals.mask_value,
                                                                                            literals.masking)
        reach = visible | open_rows
        scores = scores.masked_fill(~reach, -math.inf)
    probs, lse, empty = _softmax(scores, zero_empty_rows=literals.masking == "sdpa")
    if reach is not None:
        if empty is not None:  # nothing reaches a row SDPA zeroes
            reach = reach & ~empty
        probs = probs.masked_fill(~reach, 0.0)
    passes = reach if adds or shown is None else (shown if reach is None else reach & shown)
    if sinks is not None:
        probs, reach, passes = (None if t is None else t[..., :-1] for t in (probs, reach, passes))
    return probs, lse, reach, passes, tanh


def selected_matmul(a: torch.Tensor, b: torch.Tensor, reach: torch.Tensor | None) -> torch.Tensor:
    """a @ b with the products a[..., i, j]·b[..., j, :] formed only where j reaches row i (None: everywhere).

    A matmul forms them all, and a zero weight times a NaN or ±inf is NaN. With such values in b the finite
    part is one matmul and each row's non-finite terms are counted by indicator matmuls, then added as IEEE
    sums add them (a NaN term, a zero weight times ±inf, or +inf and −inf together: NaN; else ±inf). No
    device sync: on CUDA the counts are always made.
    """
    if reach is None:
        return a @ b
    a = torch.where(reach, a, 0.0)
    finite = b.isfinite()
    if not b.is_cuda and bool(finite.all()):
        return a @ b
    dtype = a.dtype
    hits = reach.to(dtype).expand_as(a) @ (~finite).to(dtype)  # reached non-finite terms
    inf_terms = (reach & (a != 0)).to(dtype) @ b.isinf().to(dtype)  # reached ±inf times a nonzero (or NaN) weight
    balance = (((reach & (a > 0)).to(dtype) - (reach & (a < 0)).to(dtype))  # +inf terms minus −inf terms
               @ ((b == math.inf).to(dtype) - (b == -math.inf).to(dtype)))
    special = torch.where(hits > inf_terms, math.nan, 0.0) + torch.where(inf_terms + balance > 0, math.inf, 0.0) \
        + torch.where(inf_terms - balance > 0, -math.inf, 0.0)
    return a @ torch.where(finite, b, 0.0) + special


def _dropout_scale(probs, dropout_p, generator):
    """The factor dropout multiplies the probabilities by (keep / (1 − p)), or None."""
    if dropout_p <= 0:
        return None
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return (uniform >= dropout_p).to(probs.dtype) / (1 - dropout_p)


def reference_forward(q, k, v, mask, literals: AttentionLiterals, generator: torch.Generator | None = None,
                      sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in q's dtype, natural log-sum-exp of the scores [B, Hq, Lq] in the compute dtype)."""
    probs, lse, reach, _, _ = _probabilities(q, k, mask, literals, sinks)
    dropout = _dropout_scale(probs, literals.dropout_p, generator)
    if dropout is not None:
        probs = probs * dropout
    vf = v.to(probs.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    out = selected_matmul(probs, vf, reach)
    if reach is not None and literals.masking != "sdpa":  # a row that reaches nothing: NaN, a softmax over nothing
        out = out.masked_fill(~reach.any(-1, keepdim=True), math.nan)
    return out.to(q.dtype), lse


def reference_backward(grad_out, q, k, v, mask, literals: AttentionLiterals,
                       generator: torch.Generator | None = None, sinks: torch.Tensor | None = None,
                       mask_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the formula, as autograd of the naive code gives them (for finite inputs): masked_fill
    passes no gradient to excluded scores (not even NaN), an added mask passes it; FlashAttention's formulas,
    each product formed only where the row reaches the key (the NaN rule above). With mask_grad a fourth:
    the gradient of the scores a float mask is added to, [B, Hq, Lq, Lk] in the compute dtype."""
    group = q.shape[1] // k.shape[1]
    probs, _, reach, passes, tanh = _probabilities(q, k, mask, literals, sinks)
    compute = probs.dtype
    dropout = _dropout_scale(probs, literals.dropout_p, generator)
    do = grad_out.to(compute)
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    dropped = probs if dropout is None else probs * dropout
    dv = selected_matmul(dropped.transpose(-1, -2), do, None if reach is None else reach.transpose(-1, -2))
    dp = do @ vf.transpose(-1, -2)
    if dropout is not None:
        dp = dp * dropout
    weighted = probs * dp if reach is None else torch.where(reach, probs * dp, 0.0)
    ds = probs * (dp - weighted.sum(-1, keepdim=True))
    if passes is not None:
        ds = ds.masked_fill(~passes, 0.0)
    dscores = ds
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dq = selected_matmul(ds, kf, passes) * literals.scale
    dk = selected_matmul(ds.transpose(-1, -2), qf, None if passes is None else passes.transpose(-1, -2)) \
        * literals.scale

    def per_kv_head(x):
        return x.unflatten(1, (k.shape[1], group)).sum(2)

    grads = dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)
    return (*grads, dscores) if mask_grad else grads


def attention_reference(q, k, v, mask, *literals, sinks: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """`fuser::attention` in plain torch (the op's arguments); dropout draws from `generator`."""
    return reference_forward(q, k, v, mask, AttentionLiterals(*literals), generator, sinks)[0]
