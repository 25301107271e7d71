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
    a gradient: reached and, but with "add", not replaced. `sinks` [Hq] join each row's softmax as one more score
    (unscaled, never masked, no value: GPT-OSS's sinks), whose probability is left out."""
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

    def with_sinks(x):
        if sinks is None:
            return x
        return torch.cat([x, sinks.to(compute).view(1, -1, 1, 1).expand(*x.shape[:-1], 1)], dim=-1)
    if shown is not None:
        fill = literals.mask_value
        scores = torch.where(shown, scores, scores + fill) if adds else scores.masked_fill(~shown, fill)
    reach = None
    if visible is not None:
        open_rows = torch.logsumexp(with_sinks(scores), dim=-1, keepdim=True) * LOG2E <= saturation_lse(
            literals.mask_value, literals.masking)
        reach = visible | open_rows
        scores = scores.masked_fill(~reach, -math.inf)
    probs, lse, empty = _softmax(with_sinks(scores), zero_empty_rows=literals.masking == "sdpa")
    if sinks is not None:
        probs, empty = probs[..., :-1], None
    if reach is not None:
        if empty is not None:  # nothing reaches a row SDPA zeroes
            reach = reach & ~empty
        probs = probs.masked_fill(~reach, 0.0)
    passes = reach if adds or shown is None else (shown if reach is None else reach & shown)
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


# Philox4x32-10 as Triton's tl.philox computes it (its round and key constants), so that the reference drops what the
# kernels drop, from the same seed tensor, on any device and without reading the seed on the host.
_PHILOX_ROUNDS = 10
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def _multiply_32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a·b for a < 2^32 and int64 b in [0, 2^32), in 16-bit parts (no overflow)."""
    low_part = a * (b & 0xFFFF)
    upper = a * (b >> 16) + (low_part >> 16)
    return upper >> 16, ((upper & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox_uniform(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1): the first output of tl.philox(seed, c0, c1, c2, 0) through
    tl.uint_to_uniform_float (counters are int64 tensors in [0, 2^32) that broadcast)."""
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        high_b, low_b = _multiply_32(_PHILOX_MULTIPLIERS[1], c2)
        high_a, low_a = _multiply_32(_PHILOX_MULTIPLIERS[0], c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _PHILOX_KEY_STEPS[0]) & _LOW32, (k1 + _PHILOX_KEY_STEPS[1]) & _LOW32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the bits as int32
    return torch.where(signed < 0, -signed - 1, signed).to(torch.float32) * 4.6566127342e-10


def dropout_uniforms(seed: torch.Tensor, b: int, h: int, lq: int, lk: int) -> torch.Tensor:
    """[B, H, Lq, Lk] float32 uniforms of the kernels' dropout (tiles.dropout_keep): counters (key, query,
    batch·H + head)."""
    device = seed.device
    stream = torch.arange(b * h, device=device).view(b, h, 1, 1)
    queries = torch.arange(lq, device=device).view(1, 1, lq, 1)
    keys = torch.arange(lk, device=device).view(1, 1, 1, lk)
    return philox_uniform(seed.to(torch.int64), keys, queries, stream).expand(b, h, lq, lk)


def _dropout_scale(probs, dropout_p, seed):
    """The factor dropout multiplies the probabilities by (keep / (1 − p)), or None."""
    if dropout_p <= 0:
        return None
    uniform = dropout_uniforms(seed.to(probs.device), *probs.shape)
    keep = uniform >= torch.tensor(dropout_p, dtype=torch.float32, device=probs.device)
    return keep.to(probs.dtype) / (1 - dropout_p)


def reference_forward(q, k, v, mask, literals: AttentionLiterals, seed: torch.Tensor | None = None,
                      sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in q's dtype, natural log-sum-exp of the scores [B, Hq, Lq] in the compute dtype, sinks included);
    dropout keeps what the kernels keep with this seed tensor."""
    probs, lse, reach, _, _ = _probabilities(q, k, mask, literals, sinks)
    dropout = _dropout_scale(probs, literals.dropout_p, seed)
    if dropout is not None:
        probs = probs * dropout
    vf = v.to(probs.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    out = selected_matmul(probs, vf, reach)
    if reach is not None and literals.masking != "sdpa" and sinks is None:  # a softmax over nothing: NaN
        out = out.masked_fill(~reach.any(-1, keepdim=True), math.nan)
    return out.to(q.dtype), lse


def reference_backward(grad_out, q, k, v, mask, literals: AttentionLiterals, seed: torch.Tensor | None = None,
                       sinks: torch.Tensor | None = None, mask_grad: bool = False) -> tuple:
    """(dq, dk, dv, dsinks, dmask) of the formula, as autograd of the naive code gives them (for finite inputs):
    masked_fill passes no gradient to excluded scores (not even NaN), an added mask passes it; FlashAttention's
    formulas, each product formed only where the row reaches the key (the NaN rule above). dsinks (None without
    sinks): −Σ over batch and rows of p(sink)·Δ, Δ = Σ_j p·dP (= dO·O). dmask (None unless mask_grad, a float
    mask): dS where it passes, before the softcap's tanh (the mask is added after it), summed to the mask's
    shape in the compute dtype, in the mask's dtype."""
    group = q.shape[1] // k.shape[1]
    probs, lse, reach, passes, tanh = _probabilities(q, k, mask, literals, sinks)
    compute = probs.dtype
    dropout = _dropout_scale(probs, literals.dropout_p, seed)
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
    delta = weighted.sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    dmask = None
    if mask_grad:
        dmask = (ds if passes is None else ds.masked_fill(~passes, 0.0)).sum_to_size(mask.shape).to(mask.dtype)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    if passes is not None:
        ds = ds.masked_fill(~passes, 0.0)
    dq = selected_matmul(ds, kf, passes) * literals.scale
    dk = selected_matmul(ds.transpose(-1, -2), qf, None if passes is None else passes.transpose(-1, -2)) \
        * literals.scale

    def per_kv_head(x):
        return x.unflatten(1, (k.shape[1], group)).sum(2)

    dsinks = None
    if sinks is not None:
        sink_probs = torch.exp(sinks.to(compute).view(1, -1, 1) - lse)
        dsinks = -(sink_probs * delta[..., 0]).sum((0, 2)).to(sinks.dtype)
    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype), dsinks, dmask


def attention_reference(q, k, v, mask, *literals, seed: torch.Tensor | None = None,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`fuser::attention` in plain torch (the op's arguments); dropout keeps what the kernels keep with `seed`."""
    return reference_forward(q, k, v, mask, AttentionLiterals(*literals), seed, sinks)[0]
