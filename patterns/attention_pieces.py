"""The structural pieces attention's search functions are written with (patterns/base.py: `structural`):
each lists the node shapes it accepts, or its absence, and what its parameters bind to.

`repeat_kv`, `scaled` / `scaled_scores` (a number, a symbolic scalar or a tensor on q, k or the scores:
patterns/attention_scales.py reads it),
`softcapped`, `biased` (a tensor added before the mask: T5's position bias) / `late_biased` (after a
`masked_fill` / `where`), `masked`, `with_sinks` /
`sink_dropped` (gpt-oss: `cat([scores, sinks], -1)`, its row max subtracted or not, softmax, `[..., :-1]`),
`dropout`, and the head views of batched-head code over 3-D tensors
(`split_heads` / `merged_heads`: scores [B·H, Lq, Lk] viewed as [B, H, Lq, Lk] for a mask and back).
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from fuser.patterns.attention_scales import constant_number
from fuser.patterns.base import structural
from fuser.patterns.nodes import arguments, dropout_arguments, is_number, known_equal, symbolic_scalar, tensor_meta


def _sole_user(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


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
            and len(node.args) >= 2 and is_number(node.args[1]) \
            and (node.args[2:3] == (1,) or node.kwargs.get("dim") == 1) and tensor_meta(node) is not None:
        yield node.args[0], (node.args[1],), (node,)
    yield node, (1,), ()


@structural(_repeat_kv_shapes)
def repeat_kv(x, n_rep):
    if n_rep == 1 and x.dim() != 4:  # batched heads [B·H, L, D]: nothing to repeat
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _factor(c, tensors: bool, reader: fx.Node) -> bool:
    """A node `scaled` takes as a factor: a symbolic scalar, or a tensor (any, or only a provable constant)."""
    if not isinstance(c, fx.Node) or tensor_meta(c) is None:
        return symbolic_scalar(c)
    return tensors or constant_number(c, reader) is not None


def _scaled_shapes(node, tensors: bool):
    """`x * c` (`x / c` with c a number is canonicalized to a product) with c a number, a symbolic scalar or
    a tensor; `x / c` with c a symbolic scalar or a tensor (`inverse`); or x itself (c = 1). On q and k a
    tensor that is not a provable constant is left out (`tensors` False): `q * t` is then q, as it is."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.mul:
        for x, c in (node.args, node.args[::-1]):
            if isinstance(x, fx.Node) and tensor_meta(x) is not None and c is not x:
                if is_number(c):
                    yield x, (float(c), False), (node,)
                elif _factor(c, tensors, node):
                    yield x, (c, False), (node,)
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.truediv \
            and len(node.args) == 2 and not node.kwargs and isinstance(node.args[0], fx.Node) \
            and _factor(node.args[1], tensors, node):
        yield node.args[0], (node.args[1], True), (node,)
    yield node, (1.0, False), ()


def _scale(x, scale, inverse):
    return x / scale if inverse else x * scale


scaled = structural(functools.partial(_scaled_shapes, tensors=False))(_scale)
scaled.__name__ = "scaled"
scaled_scores = structural(functools.partial(_scaled_shapes, tensors=True))(_scale)
scaled_scores.__name__ = "scaled_scores"


def _softcapped_shapes(node):
    """Gemma-2's `tanh(s / cap) * cap` (cap a number, or a symbolic scalar: then `s / cap` stays a division), or
    no softcapping (cap = 0)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.mul:
        for tanh, cap in (node.args, node.args[::-1]):
            if not (_sole_user(tanh) and tanh.target == torch.tanh):
                continue
            inner = tanh.args[0]
            if not _sole_user(inner) or len(inner.args) != 2:
                continue
            if is_number(cap) and cap > 0 and inner.target == operator.mul and is_number(inner.args[1]) \
                    and math.isclose(inner.args[1] * cap, 1.0, rel_tol=1e-6):
                yield inner.args[0], (float(cap),), (inner, tanh, node)
            elif symbolic_scalar(cap) and inner.target == operator.truediv and inner.args[1] is cap:
                yield inner.args[0], (cap,), (inner, tanh, node)
    yield node, (0.0,), ()


@structural(_softcapped_shapes)
def softcapped(scores, cap):
    return scores if cap == 0 else torch.tanh(scores / cap) * cap


def broadcasts_to(mask, scores) -> bool:
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
        orders = sorted((node.args, node.args[::-1]), key=lambda pair: not broadcasts_to(pair[1], pair[0]))
        for scores, mask in orders:
            if isinstance(mask, fx.Node) and tensor_meta(mask) is not None and isinstance(scores, fx.Node):
                yield scores, (mask, 0.0, "add"), (node,)
    if isinstance(node, fx.Node) and node.target in ("masked_fill", torch.masked_fill) and is_number(node.args[2]):
        yield node.args[0], (node.args[1], float(node.args[2]), "drop"), (node,)
    if isinstance(node, fx.Node) and node.target == torch.where and len(node.args) == 3 and is_number(node.args[2]):
        yield node.args[1], (node.args[0], float(node.args[2]), "keep"), (node,)
    yield node, (None, 0.0, "none"), ()


@structural(_masked_shapes)
def masked(scores, mask, fill, how):
    if how == "add":
        return scores + mask
    if how == "drop":
        return scores.masked_fill(mask, fill)
    return scores if how == "none" else torch.where(mask, scores, fill)


def _dropout_shapes(node):
    """Dropout in training, p a number or a symbolic scalar (which `check` turns down, saying why); or none."""
    bound = dropout_arguments(node)  # `torch.dropout(x, p, train=False)` is no dropout
    if bound is not None and (is_number(bound["p"]) or symbolic_scalar(bound["p"])) and bound["training"] is True \
            and not bound["inplace"]:
        yield bound["input"], (bound["p"] if symbolic_scalar(bound["p"]) else float(bound["p"]),), (node,)
    yield node, (0.0,), ()


@structural(_dropout_shapes)
def dropout(probs, p):
    return F.dropout(probs, p, training=p > 0)


def _view_shape(node) -> tuple | None:
    """(input, result shape) of `x.view(...)` / `x.reshape(...)` / `torch.reshape(x, ...)`, or None."""
    if not isinstance(node, fx.Node) or tensor_meta(node) is None or not node.args or node.kwargs:
        return None
    if (node.op, node.target) in (("call_method", "view"), ("call_method", "reshape"),
                                  ("call_function", torch.reshape)) and tensor_meta(node.args[0]) is not None:
        return node.args[0], tuple(tensor_meta(node).shape)
    return None


def _split_heads_shapes(node):
    """Scores [B·H, Lq, Lk] viewed as [B, H, Lq, Lk] (first dim split, the others kept): heads = (B, H) as the
    view gives them (numbers or size nodes); or no view (heads = 0)."""
    viewed = _view_shape(node)
    if viewed is not None:
        (source, shape), before = viewed, tuple(tensor_meta(viewed[0]).shape)
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if len(before) == 3 and len(shape) == 4 and len(sizes) == 4 and known_equal(shape[0] * shape[1], before[0]) \
                and all(known_equal(a, b) for a, b in zip(shape[2:], before[1:])):
            yield source, (tuple(sizes[:2]),), (node,)
    yield node, (0,), ()


@structural(_split_heads_shapes)
def split_heads(scores, heads):
    """Eagerly (examples), `heads` is H."""
    return scores if heads == 0 else scores.view(scores.shape[0] // heads, heads, *scores.shape[1:])


def _merged_heads_shapes(node):
    """Scores [B, H, Lq, Lk] viewed back as [B·H, Lq, Lk]: merged = True; or no view (False)."""
    viewed = _view_shape(node)
    if viewed is not None:
        (source, shape), before = viewed, tuple(tensor_meta(viewed[0]).shape)
        if len(before) == 4 and len(shape) == 3 and known_equal(shape[0], before[0] * before[1]) and all(
                known_equal(a, b) for a, b in zip(shape[1:], before[2:])):
            yield source, (True,), (node,)
    yield node, (False,), ()


@structural(_merged_heads_shapes)
def merged_heads(scores, merged):
    return scores.view(scores.shape[0] * scores.shape[1], *scores.shape[2:]) if merged else scores


_FILLS = ("masked_fill", torch.masked_fill, torch.where)


def _biased_shapes(node, after_fill: bool):
    """`s + bias`: a float tensor added to the scores before a mask is (T5's position bias, then its mask; FSMT's
    causal mask, then its padding masked_fill), or no bias. With a single term the mask is tried first
    (`masked`). `after_fill`: only a bias added to a `masked_fill` / `where` (the padding filled, then a bias
    added), so that two added terms are read one way (bias, then mask)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == operator.add:
        for scores, bias in (node.args, node.args[::-1]):
            if isinstance(bias, fx.Node) and isinstance(scores, fx.Node) and broadcasts_to(bias, scores) and (
                    not after_fill or _sole_user(scores) and scores.target in _FILLS):
                yield scores, (bias,), (node,)
    yield node, (None,), ()


def _add_bias(scores, bias):
    return scores if bias is None else scores + bias


biased = structural(functools.partial(_biased_shapes, after_fill=False))(_add_bias)
biased.__name__ = "biased"
late_biased = structural(functools.partial(_biased_shapes, after_fill=True))(_add_bias)
late_biased.__name__ = "late_biased"


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
    combined = torch.cat([scores, sinks.expand(*scores.shape[:-1], 1)], dim=-1)  # [1, H, 1, 1]: one per head
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
