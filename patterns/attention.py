"""Attention → `fuser::attention` (flash attention: tiled, online softmax, GQA without repeated K/V).

Two families of code:
- the naive form `softmax(q @ kᵀ · scale + mask) @ v` in every spelling transformers and
  research code use (scale on the scores or on q/k, mask added / `masked_fill` / `where`,
  softcapping, fp32 softmax and cast back, dropout, `repeat_kv` in front);
- `F.scaled_dot_product_attention` calls that are slower than they need be: `repeat_kv` in
  front (SDPA then reads repeated K/V), or a mask tensor that is really causal / sliding /
  key padding (a mask tensor drives SDPA off its flash path).
Masks are recognized from how they are built (patterns/masks.py): the kernel then runs its
native mode and reads no L×L mask; a mask it does not understand is read as a tensor.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from fuser.kernels.attention import LIMITS
from fuser.kernels.attention.reference import FLT_MAX, LOG2E
from fuser.kernels.attention.sdpa_speed import speedup_over_sdpa
from fuser.patterns.attention_examples import naive_examples, sdpa_examples
from fuser.patterns.attention_masks import MaskPlan, recognize
from fuser.patterns.attention_pieces import (biased, dropout, late_biased, masked, merged_heads, repeat_kv, scaled,
                                             scaled_scores, sink_dropped, softcapped, split_heads, with_sinks)
from fuser.patterns.attention_scales import Scale, fold, read_scale, scale_value
from fuser.patterns.base import Pattern, Search, cast, dtype_name
from fuser.patterns.nodes import is_number, symbolic_scalar, tensor_meta, value


def attention(q, k, v, n_rep, q_scale, q_inverse, k_scale, k_inverse, scale, inverse, softcap, heads, bias, mask,
              fill, how, late_bias, merged, sinks, dim, compute_dtype, sink_is_dropped, out_dtype, dropout_p):
    """softmax(q·kᵀ·scale + mask) · v, as transformers' `eager_attention_forward` and most research code write it;
    over 4-D [B, H, L, D] tensors or batched heads [B·H, L, D] (`torch.bmm`), whose scores may be viewed as
    [B, H, Lq, Lk] for the mask and back (`split_heads` / `merged_heads`); a bias added before the mask (T5,
    FSMT's causal mask before its padding masked_fill) or after a masked_fill / where (`late_bias`); gpt-oss's
    sinks in the softmax, their column dropped after it."""
    keys = repeat_kv(scaled(k, k_scale, k_inverse), n_rep)
    scores = scaled_scores(torch.matmul(scaled(q, q_scale, q_inverse), keys.transpose(-2, -1)), scale, inverse)
    scores = split_heads(softcapped(scores, softcap), heads)
    scores = merged_heads(late_biased(masked(biased(scores, bias), mask, fill, how), late_bias), merged)
    logits = cast(with_sinks(scores, sinks), compute_dtype)
    probs = cast(sink_dropped(torch.softmax(logits, dim), sink_is_dropped), out_dtype)
    return torch.matmul(dropout(probs, dropout_p), repeat_kv(v, n_rep))


def sdpa(q, k, v, n_rep, mask, dropout_p, is_causal, scale, enable_gqa):
    """`F.scaled_dot_product_attention` (arguments canonicalized to this form)."""
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout_p, is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


@dataclass(frozen=True)
class AttentionSite:
    """An attention site in the kernel's terms, whichever spelling matched (`Search.read`)."""
    n_rep: int
    scale: Scale
    softcap: float | fx.Node  # a number (0: none), or a symbolic scalar's node, given to the op at run time
    how: str                 # how the mask meets the scores: "add", "keep", "drop" or "none" (as in `masked`)
    fill: float              # what a masked score becomes
    is_causal: bool = False  # SDPA's is_causal flag
    gqa_native: bool = False  # SDPA's enable_gqa: query head h reads key head h // group
    softmax_dim: int = -1
    compute_dtype: torch.dtype | None = None
    empty_rows: str = "fill"  # fully masked rows: as the masked softmax gives them ("fill") or zeros ("sdpa")
    only_where_it_pays: bool = False  # an SDPA call: rewritten only where the kernel removes work it does
    heads: tuple | None = None  # batched heads [B·H, L, D] whose scores the code viewed as [B, H, ...]: (B, H)
    unreadable: str | None = None  # why the spelling's literals cannot be read (computed in the graph), or None


def _read_naive(m) -> AttentionSite:
    q, k, scores = m.meta("q"), m.meta("k"), tensor_meta(next(n for n in m.nodes if n.target == torch.matmul))
    heads = m["heads"] or None
    unreadable = None if (heads is None) == (not m["merged"]) else \
        "the scores are viewed as [batch, heads, ...] and not viewed back, or the other way round"
    scale = read_scale(m, {"q": q, "k": k, "scores": scores})
    return AttentionSite(m["n_rep"], scale, m["softcap"], m["how"], m["fill"], softmax_dim=m["dim"],
                         compute_dtype=m["compute_dtype"], heads=heads, unreadable=unreadable or scale.problem)


def _read_sdpa(m) -> AttentionSite:
    """SDPA adds a float mask and drops the scores a bool mask calls False; its default scale is 1/√d."""
    if not _constant_sdpa_arguments(m):
        return AttentionSite(1, Scale(), 0.0, "none", float("-inf"), unreadable=(
            "SDPA's is_causal, enable_gqa or dropout_p is computed in the graph, not a constant"))
    mask = m.meta("mask")
    how = "none" if mask is None else ("keep" if mask.dtype == torch.bool else "add")
    if symbolic_scalar(m.bindings["scale"]):
        scale = Scale(symbolic=(("scale", False),))
    else:
        scale = Scale(m["scale"] if m["scale"] is not None else 1.0 / math.sqrt(m.meta("q").shape[-1]))
    return AttentionSite(m["n_rep"], scale, 0.0, how, float("-inf"), is_causal=bool(m["is_causal"]),
                         gqa_native=bool(m["enable_gqa"]), empty_rows="sdpa", only_where_it_pays=True)


def _to_4d(m, x, meta: bool = False):
    """q, k or v as the kernel takes it: 4-D as it is; batched heads [B·H, L, D] split as the code split its
    scores (B, H), or as one batch of B·H heads [1, B·H, L, D]."""
    if m.meta("q").dim() != 3:
        return x
    heads = m.site.heads
    if meta:
        with _fake_mode(x):
            return x.unsqueeze(0) if heads is None else x.unflatten(0, tuple(value(h) for h in heads))
    return x.unsqueeze(0) if heads is None else x.unflatten(
        0, tuple(m.value_of(h) if isinstance(h, fx.Node) else h for h in heads))


def _fake_mode(t):
    return t.fake_mode if isinstance(t, torch._subclasses.FakeTensor) else contextlib.nullcontext()


def _shapes(m):
    """(q, k, v) example values as the kernel takes them (4-D), k and v before any repeat."""
    q, k, v = m.meta("q"), m.meta("k"), m.meta("v")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or {q.dim(), k.dim(), v.dim()} != {3}:
        return q, k, v
    return tuple(_to_4d(m, t, meta=True) for t in (q, k, v))


def _head_ratio(m) -> int:
    q, k, _ = _shapes(m)
    return q.shape[1] // k.shape[1]


def _large_negative(fill: float) -> bool:
    """A fill that takes a score out of the softmax (exp(−1e4) is zero in every float dtype)."""
    return fill == float("-inf") or fill <= -1e4


def _mask_plan(m) -> MaskPlan | None:
    """The recognized mask (positional modes + key padding), or None: read the mask as a tensor. An
    added mask with a small fill is read as a tensor too: its excluded scores keep weight, which
    skipping tiles would lose."""
    q, k, _ = _shapes(m)
    site, mask = m.site, m.bindings["mask"]
    if m.meta("mask") is not None and m.meta("mask").requires_grad:  # a learned bias: read, given its gradient
        return None
    if _filled_with_bias(m):  # folded with its bias into one added mask
        return None
    if site.is_causal:
        return MaskPlan(True, 0, False, None, float("-inf")) if mask is None else None
    reader = next((n for n in m.nodes if mask in n.all_input_nodes), m.output)  # the mask's value there counts
    plan = recognize(mask, site.how, site.fill, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), reader)
    if plan is not None and site.how == "add" and not _large_negative(plan.fill):
        return None
    return plan


def _biases(m) -> dict:
    """The tensors added to the scores besides the mask, by binding: "bias" (before it), "late_bias" (after a
    masked_fill / where)."""
    return {name: m.meta(name) for name in ("bias", "late_bias") if m.bindings.get(name) is not None}


def _filled_with_bias(m) -> bool:
    """A bias and a mask applied by masked_fill / where: folded into one added mask (`_folded`)."""
    return bool(_biases(m)) and m.site.how in ("keep", "drop")


def _hidden(fill: float) -> bool:
    """A score the kernel keeps from its row whatever is added to it (reference.py: a float mask at most
    −FLT_MAX/log2 e): −inf, or finfo(float32 / bfloat16).min."""
    return fill == float("-inf") or fill * LOG2E <= -FLT_MAX


def _scores_take_gradient(m) -> bool:
    """Whether a gradient reaches q·kᵀ (through q, k or a scale tensor), as traced."""
    return any(isinstance(m.meta(name), torch.Tensor) and m.meta(name).requires_grad
               for name in ("q", "k", "q_scale", "k_scale", "scale") if name in m.bindings)


def _bias_problem(m) -> str | None:
    """Why the biases cannot join the mask in the one float mask the kernel adds, or None. With masked_fill /
    where the fold is M = where(kept, bias, fill) (a bias b after the fill: where(kept, bias + b, fill + b)):
    - bias, then fill: the original's masked score is the fill, the kernel's score + fill; the same softmax
      (no weight, or equal weights in a row masked fully) only for a fill the kernel hides (`_hidden`);
    - fill, then bias: the original's is fill + b; −inf stays −inf (NaN with b +inf or NaN: M is that too), a
      finite fill plus b is a score of its own, which score + M would shift;
    - either order: where the mask hides a whole row, the filled scores carry its weight; masked_fill cuts their
      gradient, the kernel's added mask passes it: folded only where the scores take no gradient. A bias's own
      gradient is exact (`where` cuts it on filled positions as masked_fill does)."""
    biases = _biases(m)
    for b in biases.values():
        if not b.dtype.is_floating_point:
            return f"a {dtype_name(b.dtype)} tensor added to the scores as a bias (the kernel adds one float mask)"
    if "late_bias" in biases and m.site.how not in ("keep", "drop"):  # late_biased reads only a fill's output
        return "a bias added after the mask, which is not applied by masked_fill or where"
    if not _filled_with_bias(m):
        return None
    fill, by = m.site.fill, "masked_fill" if m.site.how == "drop" else "where"
    if "late_bias" in biases and fill != float("-inf"):
        return (f"a bias added after {by} with fill {fill:g}: a masked score becomes fill + bias, which the one "
                f"added mask the kernel takes cannot give (score + mask); only a -inf fill stays masked")
    if "bias" in biases and not _hidden(fill):
        return (f"a bias added, then {by} sets masked scores to {fill:g}: folded into one added mask they would be "
                f"score + {fill:g}, the same softmax only for a fill the kernel hides (-inf, finfo(float32).min)")
    if _scores_take_gradient(m):
        return (f"a bias and a mask applied by {by} while the scores take a gradient: in the one added mask the "
                f"kernel takes, a row the mask hides entirely would pass its filled scores a gradient ({by} passes "
                f"none); folded only where q and k take no gradient (eval, inference)")
    return None


def _folded(m):
    """The one float mask of the biases and a masked_fill / where mask (exact where `_bias_problem` says so),
    4-D, in the dtype the original's masked scores have."""
    present = list(_biases(m))
    dtype = functools.reduce(torch.promote_types, [m.meta(name).dtype for name in present], m.meta("q").dtype)
    terms = {name: m[name] if m.meta(name).dtype == dtype else m[name].to(dtype) for name in present}
    kept = terms["bias"] + terms["late_bias"] if len(terms) == 2 else next(iter(terms.values()))
    dropped = m.site.fill if "late_bias" not in terms else terms["late_bias"] + m.site.fill
    keep = m["mask"] if m.site.how == "keep" else torch.logical_not(m["mask"])
    rank = len(torch.broadcast_shapes(*(m.meta(name).shape for name in ("mask", *present))))
    return torch.where(keep, kept, dropped)[(None,) * (4 - rank)]


def _masking(m, plan: MaskPlan | None) -> str:
    """The code whose excluded scores and fully masked rows the kernel reproduces (see
    kernels/attention/reference.py): an added mask passes gradient to the scores it hides, unless its
    fill is −inf, which leaves the rows' own rule (SDPA gives zeros where every score is −inf)."""
    site = m.site
    if site.how == "add" and (site.empty_rows == "fill" or plan is not None and plan.fill != float("-inf")):
        return "add"
    return site.empty_rows


def _constant_sdpa_arguments(m) -> bool:
    """The flags are Python bools and dropout_p a Python number (a SymBool node is read at run time); the scale
    a number or a symbolic scalar, which the op takes at run time."""
    b = m.bindings
    return isinstance(b["is_causal"], bool) and isinstance(b["enable_gqa"], bool) and is_number(b["dropout_p"]) \
        and (b["scale"] is None or is_number(b["scale"]) or symbolic_scalar(b["scale"]))


def check(m) -> str | None:
    q, k, v = _shapes(m)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "q, k and v are not all 4-D [batch, heads, length, head_dim] or all 3-D [batch·heads, length, " \
               "head_dim] tensors"
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in LIMITS.dtypes:
        return f"q/k/v dtypes {dtype_name(q.dtype)}/{dtype_name(k.dtype)}/{dtype_name(v.dtype)} not supported"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form an attention"
    site = m.site
    if site.unreadable:
        return site.unreadable
    if symbolic_scalar(m.bindings.get("dropout_p")):
        return ("dropout p is a symbolic scalar (torch.compile(dynamic=True) passes float attributes as graph "
                "inputs): the op decides when it is traced whether to draw a dropout mask, so it takes p as a number")
    if (q.shape[1] % (k.shape[1] * site.n_rep) if site.gqa_native else k.shape[1] * site.n_rep != q.shape[1]):
        return f"{q.shape[1]} query heads for {k.shape[1]} key/value heads repeated {site.n_rep} times"
    if max(q.shape[-1], v.shape[-1]) > LIMITS.max_head_dim:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {LIMITS.max_head_dim} (kernel limit)"
    if not site.scale.symbolic and site.scale.number <= 0:  # a symbolic one: the op takes any value
        return f"scale {site.scale.number} is not positive"
    if site.softmax_dim not in (-1, 3):
        return f"softmax over dim {site.softmax_dim}, not over the keys"
    if site.compute_dtype not in (None, torch.float32, q.dtype):
        return f"softmax computed in {dtype_name(site.compute_dtype)}"
    problem = _bias_problem(m)
    if problem is not None:
        return problem
    sinks = m.meta("sinks") if m.bindings.get("sinks") is not None else None
    if sinks is not None and (not sinks.dtype.is_floating_point
                              or tuple(sinks.shape[:-1]) != (q.shape[0], q.shape[1], q.shape[2])):
        return f"sinks of shape {tuple(sinks.shape)} are not one floating logit per row"
    if sinks is not None and not all(sinks.shape[d] == 1 or sinks.stride(d) == 0 for d in (0, 2)):
        return "the sinks differ between rows of one head; the kernel takes one sink per head"
    if site.how in ("keep", "drop") and not _large_negative(site.fill):
        return f"masked scores are set to {site.fill}, not a large negative number"
    mask = m.meta("mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            return "the mask is not a bool or float tensor"
        if mask.requires_grad and (site.how != "add" or not mask.dtype.is_floating_point):
            return "the mask takes a gradient but is not a float tensor added to the scores (the kernel gives a " \
                   "gradient to an added float mask only)"
        scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            fits = mask.dim() <= 4 and tuple(torch.broadcast_shapes(mask.shape, scores)) == scores
        except RuntimeError:
            fits = False
        if not fits:
            return f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape {scores}"
    return _sdpa_worth_it(m) if site.only_where_it_pays else None


def _sdpa_mask_kind(m) -> str | None:
    """The mask kind of an SDPA call in `sdpa_speed`'s terms, or None (a kind nothing was measured for)."""
    plan = _mask_plan(m)
    if plan is None or plan.window or plan.bottom_right:
        return None
    if plan.padding is not None:
        return "padding" if plan.causal else None
    return "causal" if plan.causal else "none"


def _sdpa_measured(m) -> tuple[str, float] | None:
    """(GPU, the kernel's measured speedup over SDPA's own backend) for this call's head dim, mask kind and pass."""
    q = m.meta("q")
    training = any(m.meta(name).requires_grad for name in ("q", "k", "v"))  # as traced: no_grad makes none
    return speedup_over_sdpa(q.device, q.shape[-1], _sdpa_mask_kind(m), training)


def _sdpa_worth_it(m) -> str | None:
    """An SDPA call is rewritten where the kernel is measured faster than the backend SDPA picks (this GPU, head
    dim, mask kind, pass: `sdpa_speed`), or else only where the kernel removes work SDPA does: K/V repeated in
    front, or a mask tensor the kernel runs natively (reading no L×L mask, where the mask keeps SDPA off its
    flash path). Fully masked rows get SDPA's zeros (masking "sdpa")."""
    if m.site.n_rep > 1:
        return None
    measured = _sdpa_measured(m)
    if measured is not None:
        gpu, speedup = measured
        return None if speedup > 1.0 else (
            f"left to SDPA: its own backend is faster here (the kernel measured {speedup:.2f}x of it on {gpu} at "
            f"head dim {m.meta('q').shape[-1]}, {_sdpa_mask_kind(m)} mask; benchmarks/RESULTS.md)")
    if m.bindings["mask"] is None:
        return "left to SDPA: no repeat_kv and no mask tensor, its flash path applies"
    if _mask_plan(m) is None:
        return "left to SDPA: no repeat_kv, and its mask would be read as a tensor here too"
    return None


def replace(m):
    bias = m.get("bias")
    plan = _mask_plan(m)
    if plan is not None and bias is not None and plan.padding is not None:
        plan = None  # one mask tensor: the bias plus the padding, both added
    masking = _masking(m, plan)
    if plan is not None:
        causal, window, bottom_right, fill = plan.causal, plan.window, plan.bottom_right, plan.fill
        mask = None if plan.padding is None else m.value_of(plan.padding)[:, None, None, :]
    elif _filled_with_bias(m):
        causal, window, bottom_right, fill = False, 0, False, float("-inf")
        mask, bias, masking = _folded(m), None, "add"
    else:  # a mask the kernel reads as a tensor, with the polarity and fill of the original
        causal, window, bottom_right = False, 0, False
        how, fill = m.site.how, m.site.fill
        fill = fill if how in ("keep", "drop") else float("-inf")  # an added mask excludes nothing by itself
        mask = torch.logical_not(m["mask"]) if how == "drop" else m["mask"]
        if how == "add" and m.meta("mask").dtype == torch.bool:  # scores + bool adds 0 or 1
            mask = mask.to(m.meta("q").dtype)
        if m.meta("mask").dim() < 4:  # [Lq, Lk], [H, Lq, Lk], ...: broadcast from the right, as torch does
            mask = mask[(None,) * (4 - m.meta("mask").dim())]
    scale = m.site.scale
    q, k, v = (_to_4d(m, x) for x in (fold(m, scale, m["q"], "q"), fold(m, scale, m["k"], "k"), m["v"]))
    softcap = m["softcap"] if symbolic_scalar(m.site.softcap) else m.site.softcap
    if bias is not None:  # added to the scores like an additive mask
        mask = bias[(None,) * (4 - m.meta("bias").dim())] if mask is None else bias + mask
        masking = "add"
    sinks = m.get("sinks")
    out = torch.ops.fuser.attention(q, k, v, mask, scale_value(m, scale), causal, window, bottom_right, softcap,
                                    m["dropout_p"], fill, masking,
                                    None if sinks is None else sinks[0, :, 0, 0])  # one per head (check())
    if m.meta("q").dim() == 3:
        return out.squeeze(0) if m.site.heads is None else out.flatten(0, 1)
    return out


def describe(m) -> str:
    q, k, v = _shapes(m)
    plan = _mask_plan(m)
    if plan is None:
        parts = ["mask read as a tensor"]
    else:
        parts = [plan.describe() + (", no mask read" if m.bindings["mask"] is not None and plan.padding is None else "")]
    ratio = _head_ratio(m)
    if ratio > 1:
        parts.append(f"GQA {ratio}:1" if k.shape[1] > 1 else f"MQA {ratio}:1")
    if symbolic_scalar(m.site.softcap) or m.site.softcap:
        parts.append("softcap symbolic" if symbolic_scalar(m.site.softcap) else f"softcap {m.site.softcap:g}")
    if m.get("sinks") is not None:
        parts.append("sinks")
    if _filled_with_bias(m):
        parts.append("bias and mask folded into one tensor")
    elif m.get("bias") is not None:
        parts.append("bias read as a tensor")
    if m.site.scale.symbolic:
        parts.append("scale symbolic")
    if m.site.scale.folded:
        parts.append("scale tensor folded into " + "/".join(sorted({target for _, _, target in m.site.scale.folded})))
    if m.meta("q").dim() == 3:
        parts.append("batched heads" + (" viewed per head" if m.site.heads else ""))
    if m["dropout_p"]:
        parts.append(f"dropout {m['dropout_p']:g}")
    measured = _sdpa_measured(m) if m.site.only_where_it_pays and m.site.n_rep == 1 else None
    if measured is not None:
        parts.append("SDPA replaced: the kernel measured {1:.2f}x its backend on {0}".format(*measured))
    parts.append(f"head dim {q.shape[-1]}" + (f"/{v.shape[-1]}" if v.shape[-1] != q.shape[-1] else ""))
    parts.append(dtype_name(q.dtype))
    return ", ".join(parts)


SEARCHES = (Search(attention, lambda: naive_examples(attention), _read_naive),
            Search(sdpa, lambda: sdpa_examples(sdpa), _read_sdpa))
ATTENTION = Pattern("attention", SEARCHES, check, replace, describe, anchors=(torch.softmax,
                                                                              F.scaled_dot_product_attention))
