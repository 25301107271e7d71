"""Recognizing attention masks from how they are built, so the kernel runs its native causal /
sliding-window / key-padding modes and reads no L×L mask.

The mask's producer nodes are evaluated abstractly: `arange` vectors placed on the query
axis (dim -2) or the key axis (dim -1) are positions i + a and j + b; comparisons between
them are intervals on i − j; `&` intersects; `triu`/`tril` of ones are intervals too;
indexing a [B, Lk] tensor by (batch, key) positions is key padding; `where(m, 0, fill)` is
the additive form. Anything else is not recognized, and the mask is then read as a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

_AXES = {0: "batch", 1: "head", 2: "q", 3: "kv"}
_FLIPPED = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}


@dataclass(frozen=True)
class Index:
    """Positions along one axis: `arange + offset` (axis None until placed by indexing)."""
    axis: str | None
    offset: Any = 0


@dataclass(frozen=True)
class Keep:
    """A boolean mask, True where attention is kept: lo ≤ i − j ≤ hi (None: unbounded), and
    optionally key padding (a [B, Lk] boolean node, True = keep)."""
    lo: Any = None
    hi: Any = None
    padding: fx.Node | None = None


@dataclass(frozen=True)
class MaskPlan:
    """What the kernel needs: positional modes, an optional tensor to read, the masked score."""
    causal: bool
    window: int
    bottom_right: bool
    padding: fx.Node | None   # [B, Lk] bool, True = keep
    fill: float               # the score masked positions get in the original code

    def describe(self) -> str:
        modes = ["causal" + (" (bottom-right)" if self.bottom_right else "")] if self.causal else []
        if self.window > 0:
            modes.append(f"window {self.window}")
        if self.padding is not None:
            modes.append("key padding")
        return ", ".join(modes) or "no mask"


def _meta(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _known_equal(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _offset(value: Any) -> Any:
    """A literal or a SymInt/int node's example value, usable in index arithmetic."""
    if isinstance(value, fx.Node):
        meta = _meta(value)
        return meta if isinstance(meta, (int, torch.SymInt)) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _placed(index: Index, selector: Any) -> Index | None:
    """`index[None, None, :, None]`: the one full slice names the axis, counted from the right as
    broadcasting aligns (`index[:, None]` is the query axis of an [Lq, Lk] mask)."""
    if not isinstance(selector, tuple) or not 1 <= len(selector) <= 4:
        return None
    slots = [i for i, s in enumerate(selector) if isinstance(s, slice)]
    if len(slots) != 1 or selector[slots[0]] != slice(None) or any(s is not None for i, s in enumerate(selector)
                                                                   if i != slots[0]):
        return None
    return Index(_AXES[4 - len(selector) + slots[0]], index.offset)


def _adds_leading_axes(node: fx.Node) -> bool:
    """`mask[None, None]` / `mask[None, :, :]` / `mask.unsqueeze(0)`: new leading axes only, every
    value keeps its axis counted from the right (as broadcasting aligns them)."""
    name, args = _name(node), node.args
    if name == "unsqueeze":
        return (args[1:2] or (node.kwargs.get("dim"),))[0] == 0
    if name != "getitem" or not isinstance(args[1], tuple):
        return False
    selector = args[1]
    n = next((i for i, s in enumerate(selector) if s is not None), len(selector))
    return n > 0 and all(isinstance(s, slice) and s == slice(None) for s in selector[n:])


def _compare(op: str, a: Any, b: Any) -> Keep | None:
    """An interval on i − j from `a op b`, a and b positions on the query and key axes."""
    if isinstance(b, Index) and not isinstance(a, Index):
        a, b, op = b, a, _FLIPPED[op]
    if not isinstance(a, Index):
        return None
    if not isinstance(b, Index):  # one position against a constant: true everywhere or unsupported
        constant = _offset(b)
        if constant is not None and op in ("ge", "gt") and _known_equal(a.offset >= constant + (op == "gt"), True):
            return Keep()
        return None
    if {a.axis, b.axis} != {"q", "kv"}:
        return None
    if a.axis == "q":  # i + a ? j + b  →  j + b ?' i + a
        a, b, op = b, a, _FLIPPED[op]
    # now a is the key position j + ka, b the query position i + qb: (j + ka) op (i + qb)
    shift = a.offset - b.offset  # i − j op' shift, with op' the flipped op
    if op == "le":
        return Keep(lo=shift)          # j + ka ≤ i + qb  ⟺  i − j ≥ ka − qb
    if op == "lt":
        return Keep(lo=shift + 1)
    if op == "ge":
        return Keep(hi=shift)
    return Keep(hi=shift - 1)          # gt


def _tighter(a: Any, b: Any, pick) -> tuple[Any, bool]:
    """The tighter of two bounds (`pick` is max for lower, min for upper bounds); symbolic
    bounds must be provably equal."""
    if a is None or b is None:
        return (b if a is None else a), True
    if isinstance(a, int) and isinstance(b, int):
        return pick(a, b), True
    return a, _known_equal(a, b)


def _intersect(a: Keep, b: Keep) -> Keep | None:
    if a.padding is not None and b.padding is not None and a.padding is not b.padding:
        return None
    (lo, lo_ok), (hi, hi_ok) = _tighter(a.lo, b.lo, max), _tighter(a.hi, b.hi, min)
    if not (lo_ok and hi_ok):
        return None
    return Keep(lo, hi, a.padding if a.padding is not None else b.padding)


def _negate(keep: Keep) -> Keep | None:
    """Masked-where-True forms (`masked_fill(triu(ones, 1), -inf)`) give the kept set's complement."""
    if keep.padding is not None or (keep.lo is None) == (keep.hi is None):
        return None
    return Keep(hi=keep.lo - 1) if keep.lo is not None else Keep(lo=keep.hi + 1)


def _name(node: fx.Node) -> str | None:
    """One name for an op's function and method spellings (`torch.le`, `operator.le`, `x.le`)."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


_COMPARISONS = {"le", "lt", "ge", "gt"}
_ANDS = {"and_", "logical_and", "bitwise_and", "__and__"}
_NOTS = {"invert", "logical_not", "bitwise_not", "__invert__"}
_PASS_THROUGH = {"to", "expand", "bool", "broadcast_to", "contiguous"}
_ONES = {"ones", "ones_like", "new_ones"}


def _evaluate(node: Any, depth: int = 0) -> Any:
    """The abstract value of a mask-building node: Index, Keep, True, or None (not understood)."""
    if not isinstance(node, fx.Node) or depth > 64:
        return True if node is True else None
    name, args = _name(node), node.args
    if name == "arange":
        bounds = [a for a in args if not isinstance(a, torch.dtype)]
        return Index(None, _offset(bounds[0]) if len(bounds) >= 2 else 0)
    if name in ("add", "sub") and len(args) == 2:
        base, other = _evaluate(args[0], depth + 1), _offset(args[1])
        if isinstance(base, Index) and other is not None:
            return Index(base.axis, base.offset + other if name == "add" else base.offset - other)
        return None
    if name == "getitem":
        base = _evaluate(args[0], depth + 1)
        if isinstance(base, Index) and base.axis is None:
            return _placed(base, args[1])
        if isinstance(base, Keep) and _adds_leading_axes(node):
            return base
        table = _meta(args[0])
        if isinstance(table, torch.Tensor) and table.dtype == torch.bool and table.dim() == 2:
            selector = args[1]  # table[:, None, None, :]: a [B, Lk] table as a [B, 1, 1, Lk] mask
            if isinstance(selector, tuple) and [s is None for s in selector] == [False, True, True, False] \
                    and all(isinstance(s, slice) and s == slice(None) for s in selector[::3]):
                return Keep(padding=args[0])
            if isinstance(args[1], tuple) and len(args[1]) == 2:
                rows, cols = (_evaluate(a, depth + 1) for a in args[1])
                if rows == Index("batch", 0) and cols == Index("kv", 0):
                    return Keep(padding=args[0])
        return None
    if name in _COMPARISONS:
        right = args[1] if _offset(args[1]) is not None else _evaluate(args[1], depth + 1)
        return _compare(name, _evaluate(args[0], depth + 1), right)
    if name in _ANDS:
        parts = [Keep() if p is True else p for p in (_evaluate(a, depth + 1) for a in args)]
        return _intersect(*parts) if len(parts) == 2 and all(isinstance(p, Keep) for p in parts) else None
    if name in _ONES:
        return True
    if name in _PASS_THROUGH:
        return _evaluate(args[0], depth + 1)
    if name == "unsqueeze" and _adds_leading_axes(node):
        base = _evaluate(args[0], depth + 1)
        return base if isinstance(base, Keep) else None
    if name in ("triu", "tril"):
        base = _evaluate(args[0], depth + 1)
        diagonal = args[1] if len(args) > 1 else node.kwargs.get("diagonal", 0)
        if base is True and isinstance(diagonal, int):  # triu: j − i ≥ d; tril: j − i ≤ d
            return Keep(hi=-diagonal) if name == "triu" else Keep(lo=-diagonal)
        return None
    if name in _NOTS:
        inner = _evaluate(args[0], depth + 1)
        return _negate(inner) if isinstance(inner, Keep) else None
    return None


def _zero(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return value.op == "call_function" and value.target in (torch.zeros, torch.zeros_like) or (
            value.op == "call_function" and value.target == torch.tensor and value.args[:1] in ((0,), (0.0,)))
    return value == 0


def _constant_fill(node: Any) -> Any:
    """The number a `full(size, fill)` / `full_like(x, fill)` / `x.new_full(size, fill)` node holds, or None."""
    if not isinstance(node, fx.Node):
        return None
    name, args = _name(node), node.args
    fill = {"full": args[1:2], "full_like": args[1:2], "new_full": args[2:3]}.get(name, ())
    fill = fill[0] if fill else node.kwargs.get("fill_value")
    return fill if isinstance(fill, (int, float)) and not isinstance(fill, bool) else None


def _additive_triangle(mask: fx.Node) -> tuple[Keep, float] | None:
    """`triu(full((L, L), fill), d)`: fill where j − i ≥ d, 0 elsewhere (kept: i − j ≥ 1 − d);
    `tril(full(...), d)`: fill where j − i ≤ d (kept: i − j ≤ −d − 1)."""
    name = _name(mask)
    if name not in ("triu", "tril"):
        return None
    fill = _constant_fill(mask.args[0])
    diagonal = mask.args[1] if len(mask.args) > 1 else mask.kwargs.get("diagonal", 0)
    if fill is None or not isinstance(diagonal, int) or isinstance(diagonal, bool):
        return None
    return (Keep(lo=1 - diagonal) if name == "triu" else Keep(hi=-diagonal - 1)), fill


def recognize(mask: Any, how: str, fill: Any, lq: Any, lk: Any) -> MaskPlan | None:
    """The plan for a mask used as `how` ("add": scores + mask; "keep": where(mask, scores, fill);
    "drop": scores.masked_fill(mask, fill)), or None when its construction is not understood."""
    if mask is None:
        return MaskPlan(False, 0, False, None, float("-inf"))
    if how == "add":  # additive masks of transformers: where(keep, 0, finfo.min), perhaps cast or expanded
        while isinstance(mask, fx.Node) and (_name(mask) in _PASS_THROUGH or _adds_leading_axes(mask)):
            mask = mask.args[0]
        triangle = _additive_triangle(mask) if isinstance(mask, fx.Node) else None
        if triangle is not None:  # triu(full((L, L), -inf), 1): the causal mask of research code
            return _plan(triangle[0], float(triangle[1]), lq, lk)
        if not (isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target == torch.where):
            return None
        condition, kept_value, fill = mask.args
        if not _zero(kept_value) or not isinstance(fill, (int, float)):
            return None
        keep = _evaluate(condition)
    else:
        keep = _evaluate(mask)
        if how == "drop" and isinstance(keep, Keep):
            keep = _negate(keep)
    if keep is True:
        keep = Keep()
    if not isinstance(keep, Keep) or not isinstance(fill, (int, float)):
        return None
    return _plan(keep, float(fill), lq, lk)


def _plan(keep: Keep, fill: float, lq: Any, lk: Any) -> MaskPlan | None:
    """Map lo ≤ i − j ≤ hi onto the kernel: causal with the query offset d = −lo (0 for
    top-left, Lk − Lq for bottom-right), window W = hi + d + 1."""
    if keep.lo is None:
        if keep.hi is not None:
            return None  # a window with no causal bound: not a kernel mode
        return MaskPlan(False, 0, False, keep.padding, fill)
    offset = -keep.lo
    if _known_equal(offset, 0):
        bottom_right = False
    elif _known_equal(offset, lk - lq):
        bottom_right = True
    else:
        return None
    window = 0
    if keep.hi is not None:
        window = keep.hi + offset + 1
        if not isinstance(window, int) or window <= 0:
            return None
    return MaskPlan(True, window, bottom_right, keep.padding, fill)
