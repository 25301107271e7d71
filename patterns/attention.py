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

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import fx

from fuser.kernels.attention import LIMITS
from fuser.patterns.base import Example, Pattern, Search, cast, dtype_name, structural
from fuser.patterns.attention_masks import MaskPlan, recognize
from fuser.patterns.nodes import arguments, dropout_arguments, tensor_meta
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors


def _sole_user(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


def _literal(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _repeat_kv_shapes(node):
    """transformers' `repeat_kv`: x[:, :, None].expand(b, h, n, s, d).reshape(b, h·n, s, d), or
    `repeat_interleave(n, dim=1)`; or no repeat (n = 1)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape":
        expand = node.args[0]
        if _sole_user(expand) and expand.op == "call_method" and expand.target == "expand":
            index = expand.args[0]
            full = slice(None)
            if _sole_user(index) and index.op == "call_function" and index.target == operator.getitem \
                    and index.args[1] == (full, full, None, full, full) and tensor_meta(expand) is not None:
                yield index.args[0], (tensor_meta(expand).shape[2],), (index, expand, node)
    if isinstance(node, fx.Node) and node.target in ("repeat_interleave", torch.repeat_interleave) \
            and len(node.args) >= 2 and _literal(node.args[1]) \
            and (node.args[2:3] == (1,) or node.kwargs.get("dim") == 1) and tensor_meta(node) is not None:
        yield node.args[0], (node.args[1],), (node,)
    yield node, (1,), ()


@structural(_repeat_kv_shapes)
def repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _scaled_shapes(node):
    """`x * c` with c a number (also `x / c`, canonicalized to a product), or x itself (c = 1)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.mul:
        for x, c in (node.args, node.args[::-1]):
            if isinstance(x, fx.Node) and _literal(c):
                yield x, (float(c),), (node,)
    yield node, (1.0,), ()


@structural(_scaled_shapes)
def scaled(x, scale):
    return x * scale


def _softcapped_shapes(node):
    """Gemma-2's `tanh(s / cap) * cap`, or no softcapping (cap = 0)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.mul:
        for tanh, cap in (node.args, node.args[::-1]):
            if _sole_user(tanh) and tanh.target == torch.tanh and _literal(cap) and cap > 0:
                inner = tanh.args[0]
                if _sole_user(inner) and inner.target == operator.mul and inner.args[1:] and _literal(inner.args[1]) \
                        and math.isclose(inner.args[1] * cap, 1.0, rel_tol=1e-6):
                    yield inner.args[0], (float(cap),), (inner, tanh, node)
    yield node, (0.0,), ()


@structural(_softcapped_shapes)
def softcapped(scores, cap):
    return scores if cap == 0 else torch.tanh(scores / cap) * cap


def _broadcasts_to(mask, scores) -> bool:
    """Whether the mask's shape broadcasts to the scores' shape (and not the scores to a larger one)."""
    mask, scores = tensor_meta(mask), tensor_meta(scores)
    if mask is None or scores is None or mask.dim() > scores.dim():
        return False
    try:
        return tuple(torch.broadcast_shapes(mask.shape, scores.shape)) == tuple(scores.shape)
    except RuntimeError:
        return False


def _masked_shapes(node):
    """`s + mask` (additive), `s.masked_fill(mask, fill)` (True = masked), `torch.where(mask, s, fill)`
    (True = kept), or no mask."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.add:
        # a mask of any rank ([Lq, Lk], [H, Lq, Lk], [B, 1, 1, Lk], ...): check() rejects one that does
        # not broadcast to the scores; the order whose mask does is tried first
        orders = sorted((node.args, node.args[::-1]), key=lambda pair: not _broadcasts_to(pair[1], pair[0]))
        for scores, mask in orders:
            if isinstance(mask, fx.Node) and tensor_meta(mask) is not None and isinstance(scores, fx.Node):
                yield scores, (mask, 0.0, "add"), (node,)
    if isinstance(node, fx.Node) and node.target in ("masked_fill", torch.masked_fill) and _literal(node.args[2]):
        yield node.args[0], (node.args[1], float(node.args[2]), "drop"), (node,)
    if isinstance(node, fx.Node) and node.target == torch.where and len(node.args) == 3 and _literal(node.args[2]):
        yield node.args[1], (node.args[0], float(node.args[2]), "keep"), (node,)
    yield node, (None, 0.0, "none"), ()


def _biased_shapes(node):
    """`s + bias`: a float tensor added to the scores before a mask is (T5's position bias, then its mask), or no
    bias. With a single term the mask is tried first (`masked`)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.add:
        for scores, bias in (node.args, node.args[::-1]):
            if isinstance(bias, fx.Node) and isinstance(scores, fx.Node) and _broadcasts_to(bias, scores):
                yield scores, (bias,), (node,)
    yield node, (None,), ()


@structural(_biased_shapes)
def biased(scores, bias):
    return scores if bias is None else scores + bias


@structural(_masked_shapes)
def masked(scores, mask, fill, how):
    if how == "add":
        return scores + mask
    if how == "drop":
        return scores.masked_fill(mask, fill)
    return scores if how == "none" else torch.where(mask, scores, fill)


def _last_dim(node, dim) -> bool:
    meta = tensor_meta(node)
    return meta is not None and dim in (-1, meta.dim() - 1)


def _row_max(node, x) -> tuple | None:
    """The nodes of `x.max(dim=-1, keepdim=True).values` / `[0]` or `x.amax(-1, keepdim=True)` (any spelling)
    that `node` is, or None."""
    covered = (node,)
    if isinstance(node, fx.Node) and node.target == operator.getitem and node.args[1:] == (0,):
        node, names = node.args[0], ("max", torch.max)
        covered = (node, *covered)
    else:
        names = ("amax", torch.amax)
    if not isinstance(node, fx.Node) or node.target not in names:
        return None
    bound = arguments(node, ("input", "dim", "keepdim"), {"keepdim": False})
    if bound is None or bound["input"] is not x or bound["keepdim"] is not True or not _last_dim(x, bound["dim"]):
        return None
    return covered


def _with_sinks_shapes(node):
    """gpt-oss's `torch.cat([scores, sinks], dim=-1)` (sinks [..., 1]: one logit per row), its row max subtracted
    or not (which changes no softmax): the sinks join the softmax's denominator. Or no sinks."""
    combined, around = node, ()
    if isinstance(node, fx.Node) and node.target == operator.sub and len(node.args) == 2:
        row_max = _row_max(node.args[1], node.args[0])
        if row_max is not None:
            combined, around = node.args[0], (*row_max, node)
    bound = arguments(combined, ("tensors", "dim"), {"dim": 0}) if isinstance(combined, fx.Node) \
        and combined.target == torch.cat else None
    if bound is not None and isinstance(bound["tensors"], (list, tuple)) and len(bound["tensors"]) == 2:
        scores, sinks = bound["tensors"]
        meta = tensor_meta(sinks)
        if isinstance(scores, fx.Node) and meta is not None and meta.shape[-1] == 1 and _last_dim(combined, bound["dim"]):
            yield scores, (sinks,), (combined, *around)
    yield node, (None,), ()


@structural(_with_sinks_shapes)
def with_sinks(scores, sinks):
    if sinks is None:
        return scores
    combined = torch.cat([scores, sinks], dim=-1)
    return combined - combined.max(dim=-1, keepdim=True).values


def _sink_dropped_shapes(node):
    """`probs[..., :-1]`: the sinks' column dropped after the softmax, or nothing dropped. (Sinks not dropped, or
    a column dropped with no sinks, leave p·v with one key more or fewer than k: check()'s shapes refuse it.)"""
    if isinstance(node, fx.Node) and node.target == operator.getitem and isinstance(node.args[0], fx.Node):
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        meta = tensor_meta(node.args[0])
        if index and meta is not None and index[-1] == slice(None, -1, None) and all(
                i is Ellipsis or i == slice(None) for i in index[:-1]) and (
                Ellipsis in index or len(index) == meta.dim()):
            yield node.args[0], (True,), (node,)
    yield node, (False,), ()


@structural(_sink_dropped_shapes)
def sink_dropped(probs, dropped):
    return probs[..., :-1] if dropped else probs


def _dropout_shapes(node):
    bound = dropout_arguments(node)  # `torch.dropout(x, p, train=False)` is no dropout
    if bound is not None and _literal(bound["p"]) and bound["training"] is True and not bound["inplace"]:
        yield bound["input"], (float(bound["p"]),), (node,)
    yield node, (0.0,), ()


@structural(_dropout_shapes)
def dropout(probs, p):
    return F.dropout(probs, p, training=p > 0)


def attention(q, k, v, n_rep, q_scale, k_scale, scale, softcap, bias, mask, fill, how, sinks, dim, compute_dtype,
              sink_is_dropped, out_dtype, dropout_p):
    """softmax(q·kᵀ·scale + mask) · v, as transformers' `eager_attention_forward` and most research code write it
    (gpt-oss: with sinks in the softmax, their column dropped after it)."""
    keys = repeat_kv(scaled(k, k_scale), n_rep)
    scores = softcapped(scaled(torch.matmul(scaled(q, q_scale), keys.transpose(-2, -1)), scale), softcap)
    logits = cast(with_sinks(masked(biased(scores, bias), mask, fill, how), sinks), compute_dtype)
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
    scale: float
    softcap: float
    how: str                 # how the mask meets the scores: "add", "keep", "drop" or "none" (as in `masked`)
    fill: float              # what a masked score becomes
    is_causal: bool = False  # SDPA's is_causal flag
    gqa_native: bool = False  # SDPA's enable_gqa: query head h reads key head h // group
    softmax_dim: int = -1
    compute_dtype: torch.dtype | None = None
    empty_rows: str = "fill"  # fully masked rows: as the masked softmax gives them ("fill") or zeros ("sdpa")
    only_where_it_pays: bool = False  # an SDPA call: rewritten only where the kernel removes work it does
    unreadable: str | None = None  # why the spelling's literals cannot be read (computed in the graph), or None


def _read_naive(m) -> AttentionSite:
    return AttentionSite(m["n_rep"], m["q_scale"] * m["k_scale"] * m["scale"], m["softcap"], m["how"], m["fill"],
                         softmax_dim=m["dim"], compute_dtype=m["compute_dtype"])


def _read_sdpa(m) -> AttentionSite:
    """SDPA adds a float mask and drops the scores a bool mask calls False; its default scale is 1/√d."""
    if not _constant_sdpa_arguments(m):
        return AttentionSite(1, 1.0, 0.0, "none", float("-inf"), unreadable=(
            "SDPA's is_causal, enable_gqa, dropout_p or scale is computed in the graph, not a constant"))
    mask = m.meta("mask")
    how = "none" if mask is None else ("keep" if mask.dtype == torch.bool else "add")
    scale = m["scale"] if m["scale"] is not None else 1.0 / math.sqrt(m.meta("q").shape[-1])
    return AttentionSite(m["n_rep"], scale, 0.0, how, float("-inf"), is_causal=bool(m["is_causal"]),
                         gqa_native=bool(m["enable_gqa"]), empty_rows="sdpa", only_where_it_pays=True)


def _shapes(m):
    """(q, k, v) example values, k and v before any repeat."""
    return m.meta("q"), m.meta("k"), m.meta("v")


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
    if m.meta("mask") is not None and m.meta("mask").requires_grad:  # a learned bias: read, and given its gradient
        return None
    if site.is_causal:
        return MaskPlan(True, 0, False, None, float("-inf")) if mask is None else None
    reader = next((n for n in m.nodes if mask in n.all_input_nodes), m.output)  # the mask's value there counts
    plan = recognize(mask, site.how, site.fill, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), reader)
    if plan is not None and site.how == "add" and not _large_negative(plan.fill):
        return None
    return plan


def _masking(m, plan: MaskPlan | None) -> str:
    """The code whose excluded scores and fully masked rows the kernel reproduces (see
    kernels/attention/reference.py): an added mask passes gradient to the scores it hides, unless its
    fill is −inf, which leaves the rows' own rule (SDPA gives zeros where every score is −inf)."""
    site = m.site
    if site.how == "add" and (site.empty_rows == "fill" or plan is not None and plan.fill != float("-inf")):
        return "add"
    return site.empty_rows


def _constant_sdpa_arguments(m) -> bool:
    """The flags are Python bools and the numbers Python numbers (a SymBool or SymFloat node is read at run time)."""
    b = m.bindings
    return isinstance(b["is_causal"], bool) and isinstance(b["enable_gqa"], bool) and _literal(b["dropout_p"]) \
        and (b["scale"] is None or _literal(b["scale"]))


def check(m) -> str | None:
    q, k, v = _shapes(m)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "q, k and v are not all 4-D [batch, heads, length, head_dim] tensors"
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in LIMITS.dtypes:
        return f"q/k/v dtypes {dtype_name(q.dtype)}/{dtype_name(k.dtype)}/{dtype_name(v.dtype)} not supported"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form an attention"
    site = m.site
    if site.unreadable:
        return site.unreadable
    if (q.shape[1] % (k.shape[1] * site.n_rep) if site.gqa_native else k.shape[1] * site.n_rep != q.shape[1]):
        return f"{q.shape[1]} query heads for {k.shape[1]} key/value heads repeated {site.n_rep} times"
    if max(q.shape[-1], v.shape[-1]) > LIMITS.max_head_dim:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {LIMITS.max_head_dim} (kernel limit)"
    if site.scale <= 0:
        return f"scale {site.scale} is not positive"
    if site.softmax_dim not in (-1, 3):
        return f"softmax over dim {site.softmax_dim}, not over the keys"
    if site.compute_dtype not in (None, torch.float32, q.dtype):
        return f"softmax computed in {dtype_name(site.compute_dtype)}"
    bias = m.meta("bias") if m.bindings.get("bias") is not None else None
    if bias is not None and (not bias.dtype.is_floating_point or site.how not in ("add", "none")):
        return (f"a {dtype_name(bias.dtype)} bias added to the scores, then a mask applied by "
                f"{'masked_fill' if site.how == 'drop' else 'where'}: one mask tensor at most")
    sinks = m.meta("sinks") if m.bindings.get("sinks") is not None else None
    if sinks is not None and (not sinks.dtype.is_floating_point
                              or tuple(sinks.shape[:-1]) != (q.shape[0], q.shape[1], q.shape[2])):
        return f"sinks of shape {tuple(sinks.shape)} are not one floating logit per row"
    if site.how in ("keep", "drop") and not _large_negative(site.fill):
        return f"masked scores are set to {site.fill}, not a large negative number"
    mask = m.meta("mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            return "the mask is not a bool or float tensor"
        if mask.requires_grad and site.how != "add":
            return "the mask takes a gradient but is not added to the scores"
        scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            fits = mask.dim() <= 4 and tuple(torch.broadcast_shapes(mask.shape, scores)) == scores
        except RuntimeError:
            fits = False
        if not fits:
            return f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape {scores}"
    return _sdpa_worth_it(m) if site.only_where_it_pays else None


def _sdpa_worth_it(m) -> str | None:
    """An SDPA call is rewritten only where the kernel removes work SDPA does: K/V repeated in
    front, or a mask tensor the kernel runs natively (reading no L×L mask, where the mask keeps
    SDPA off its flash path). Fully masked rows get SDPA's zeros (masking "sdpa")."""
    if m.site.n_rep > 1:
        return None
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
    if plan is not None:
        causal, window, bottom_right, fill = plan.causal, plan.window, plan.bottom_right, plan.fill
        mask = None if plan.padding is None else m.value_of(plan.padding)[:, None, None, :]
    else:  # a mask the kernel reads as a tensor, with the polarity and fill of the original
        causal, window, bottom_right = False, 0, False
        how, fill = m.site.how, m.site.fill
        fill = fill if how in ("keep", "drop") else float("-inf")  # an added mask excludes nothing by itself
        mask = torch.logical_not(m["mask"]) if how == "drop" else m["mask"]
        if how == "add" and m.meta("mask").dtype == torch.bool:  # scores + bool adds 0 or 1
            mask = mask.to(m.meta("q").dtype)
        if m.meta("mask").dim() < 4:  # [Lq, Lk], [H, Lq, Lk], ...: broadcast from the right, as torch does
            mask = mask[(None,) * (4 - m.meta("mask").dim())]
    masking = _masking(m, plan)
    if bias is not None:  # added to the scores like an additive mask (and given its gradient)
        mask = bias[(None,) * (4 - m.meta("bias").dim())] if mask is None else bias + mask
        masking = "add"
    sinks = m.get("sinks")
    return torch.ops.fuser.attention(m["q"], m["k"], m["v"], mask, m.site.scale, causal, window, bottom_right,
                                     m.site.softcap, m["dropout_p"], fill, masking,
                                     None if sinks is None else sinks[..., 0])


def describe(m) -> str:
    q, k, v = _shapes(m)
    plan = _mask_plan(m)
    if plan is None:
        parts = ["mask read as a tensor"]
    else:
        parts = [plan.describe() + (", no mask read" if m.bindings["mask"] is not None and plan.padding is None else "")]
    if m.get("bias") is not None:
        parts.append("bias read as a tensor")
    ratio = _head_ratio(m)
    if ratio > 1:
        parts.append(f"GQA {ratio}:1" if k.shape[1] > 1 else f"MQA {ratio}:1")
    if m.site.softcap:
        parts.append(f"softcap {m.site.softcap:g}")
    if m.get("sinks") is not None:
        parts.append("sinks")
    if m["dropout_p"]:
        parts.append(f"dropout {m['dropout_p']:g}")
    parts.append(f"head dim {q.shape[-1]}" + (f"/{v.shape[-1]}" if v.shape[-1] != q.shape[-1] else ""))
    parts.append(dtype_name(q.dtype))
    return ", ".join(parts)


def _qkv(draw, n_rep_choices) -> tuple:
    """(dtype, q, k, v, n_rep): any batch, heads, lengths (1 and unequal ones included) and head dims."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    batch, kv_heads, n_rep = draw(sizes(2)), draw(st.integers(1, 2)), draw(st.sampled_from(n_rep_choices))
    lq = draw(st.one_of(st.just(1), st.integers(1, 40)))
    lk = draw(st.one_of(st.just(lq), st.integers(1, 40)))
    d = draw(st.sampled_from([8, 16, 24]))
    dv = draw(st.sampled_from([d, 8]))
    q = draw(tensors((batch, kv_heads * n_rep, lq, d), dtype))
    k = draw(tensors((batch, kv_heads, lk, d), dtype))
    v = draw(tensors((batch, kv_heads, lk, dv), dtype))
    return dtype, q, k, v, n_rep


@st.composite
def _examples(draw) -> Example:
    dtype, q, k, v, n_rep = _qkv(draw, [1, 2, 3, 4])
    batch, lq, lk, d = q.shape[0], q.shape[2], k.shape[2], q.shape[3]
    kv_heads = k.shape[1]
    mask_kind = draw(st.sampled_from(["none", "additive", "keep", "drop"]))
    mask, how, fill = None, "none", 0.0
    mask_shape = draw(st.sampled_from([(batch, 1, lq, lk), (1, 1, lq, lk), (lq, lk), (kv_heads * n_rep, lq, lk)]))
    if mask_kind == "additive":
        keep = draw(tensors(mask_shape, torch.float32, layout="contiguous")) > -0.5
        mask, how = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype), "add"
    elif mask_kind in ("keep", "drop"):
        keep = draw(tensors(mask_shape[1:] if len(mask_shape) == 4 else mask_shape, torch.float32,
                            layout="contiguous")) > -0.3
        keep[..., 0] = True  # at least one visible key per row: -inf rows are NaN on both sides
        mask, how, fill = (keep if mask_kind == "keep" else ~keep), mask_kind, float("-inf")
    upcast = draw(st.booleans())
    sinks = draw(tensors((kv_heads * n_rep, 1, 1), dtype)).expand(batch, -1, lq, 1) if draw(st.booleans()) else None
    bias = draw(tensors((1, kv_heads * n_rep, lq, lk), dtype)) if how in ("add", "none") and draw(st.booleans()) \
        else None  # a learned bias (takes a gradient), then the mask
    return Example(attention, dict(
        q=q, k=k, v=v, mask=mask, n_rep=n_rep, q_scale=1.0, k_scale=1.0, scale=1.0 / math.sqrt(d),
        softcap=draw(st.sampled_from([0.0, 0.0, 20.0])), bias=bias, fill=fill, how=how, sinks=sinks, dim=-1,
        compute_dtype=torch.float32 if upcast else None, sink_is_dropped=sinks is not None,
        out_dtype=dtype if upcast else None, dropout_p=0.0), constants=("mask",))


@st.composite
def _sdpa_examples(draw) -> Example:
    """SDPA calls the pattern rewrites without a mask builder to read: K/V repeated in front (`repeat_kv`),
    with no mask, a bool or float mask tensor, or is_causal."""
    dtype, q, k, v, n_rep = _qkv(draw, [2, 3, 4])
    lq, lk = q.shape[2], k.shape[2]
    mask_kind = draw(st.sampled_from(["none", "causal", "keep", "additive"]))
    mask = None
    if mask_kind == "keep":
        mask = draw(tensors((lq, lk), torch.float32, layout="contiguous")) > -0.3
        mask[..., 0] = True  # at least one visible key per row
    elif mask_kind == "additive":
        mask = draw(tensors((1, 1, lq, lk), dtype, layout="contiguous"))
    return Example(sdpa, dict(q=q, k=k, v=v, n_rep=n_rep, mask=mask, dropout_p=0.0, is_causal=mask_kind == "causal",
                              scale=draw(st.sampled_from([None, 0.3])), enable_gqa=False), constants=("mask",))


SEARCHES = (Search(attention, _examples, _read_naive), Search(sdpa, _sdpa_examples, _read_sdpa))
ATTENTION = Pattern("attention", SEARCHES, check, replace, describe, anchors=(torch.softmax,
                                                                              F.scaled_dot_product_attention))
