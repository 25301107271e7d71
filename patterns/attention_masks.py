"""Recognizing attention masks from how they are built, so the kernel runs its native causal /
sliding-window / key-padding modes and reads no L×L mask.

The mask's value where the attention reads it is evaluated exactly (patterns/mask_reading.py: every
op modeled with every argument it takes, every write into it before the read modeled too, or the
value is not understood). Broadcast to the scores [B, H, Lq, Lk], the positions it keeps must be
lo ≤ i − j ≤ hi and at most one [B, Lk] boolean table read at (batch, key), and an added mask must
take two values, 0 where kept; anything else, understood or not, is read as a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fuser.patterns.mask_algebra import TRUE, Cell, Lin, Pieces, Unknown, broadcast_mapping, remapped, value_key
from fuser.patterns.mask_reading import MaskReader
from fuser.patterns.nodes import known_equal, known_true, tensor_meta


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



def recognize(mask: Any, how: str, fill: Any, scores: tuple, reader: fx.Node) -> MaskPlan | None:
    """The plan for a mask used as `how` ("add": scores + mask; "keep": where(mask, scores, fill);
    "drop": scores.masked_fill(mask, fill)) on scores of shape `scores` [B, H, Lq, Lk] by the node
    `reader`, or None: its value there is not understood, or is no kernel mode (read it as a tensor)."""
    if mask is None:
        return MaskPlan(False, 0, False, None, float("-inf"))
    if not isinstance(mask, fx.Node) or tensor_meta(mask) is None:
        return None
    reading = MaskReader(mask.graph)
    try:
        keep, fill = _kept(reading.at(mask, reading.position[reader]), how, fill, scores)
    except Unknown:
        return None
    if not isinstance(fill, (int, float)) or isinstance(fill, bool):
        return None
    return _plan(keep, float(fill), scores[2], scores[3])


def _kept(value: Any, how: str, fill: Any, scores: tuple) -> tuple[Keep, Any]:
    """Where the mask keeps scores (as lo ≤ i − j ≤ hi and key padding), and the fill of the others."""
    if not isinstance(value, Pieces) or len(value.shape) > 4 or any(
            not (known_true(s == 1) or known_equal(s, t)) for s, t in zip(value.shape[::-1], scores[::-1])):
        raise Unknown("a mask that is not piecewise constant on the scores")
    value = remapped(value, broadcast_mapping(value.shape, scores), scores)
    if how == "add":  # kept where 0 is added; the one other value is the fill
        if not value.dtype.is_floating_point:
            raise Unknown("an added mask that is not floating point")
        others = {value_key(v): v for _, v in value.pieces if v != 0}
        if len(others) > 1:
            raise Unknown("an added mask of more than two values")
        return _keep(value.where(lambda v: v == 0), scores), next(iter(others.values()), float("-inf"))
    if value.dtype != torch.bool:
        raise Unknown("a boolean mask of another dtype")
    return _keep(value.where(lambda v: v is (how == "keep")), scores), fill


def _keep(region: frozenset, scores: tuple) -> Keep:
    """A region of the scores' coordinates (b, h, i, j) as lo ≤ i − j ≤ hi and a [B, Lk] table at (b, j)."""
    if region == TRUE:
        return Keep()
    if len(region) != 1:
        raise Unknown("a mask that is a union of regions")
    lo = hi = padding = None
    batch, key = Lin.coord(0).on_box(scores), Lin.coord(3).on_box(scores)
    for lit in next(iter(region)):
        if isinstance(lit, Cell):
            table = tensor_meta(lit.node)
            if padding is not None or not lit.positive or lit.indices != (batch, key) or table.dim() != 2 or \
                    not (known_equal(table.shape[0], scores[0]) and known_equal(table.shape[1], scores[3])):
                raise Unknown("a boolean tensor that is not a [B, Lk] key padding table")
            padding = lit.node
            continue
        sign = _difference_sign(lit.f, scores)  # lit: sign · (i − j) + c ≥ 0
        if sign == 1 and lo is None:
            lo = -lit.f.const
        elif sign == -1 and hi is None:
            hi = lit.f.const
        else:
            raise Unknown("a bound that is not on i − j")
    return Keep(lo, hi, padding)


def _difference_sign(f: Lin, scores: tuple) -> int | None:
    """s where f = s · (i − j) + c, s = ±1, i and j the query and key coordinates (one of size 1 is 0)."""
    coeffs = dict(f.coeffs)
    if set(coeffs) - {2, 3}:
        return None
    i, j = coeffs.get(2), coeffs.get(3)
    if i is not None and j is not None:
        return i if i == -j and abs(i) == 1 else None
    if i is None and j is not None and known_true(scores[2] == 1):
        return -j if abs(j) == 1 else None
    if j is None and i is not None and known_true(scores[3] == 1):
        return i if abs(i) == 1 else None
    return None


def _plan(keep: Keep, fill: float, lq: Any, lk: Any) -> MaskPlan | None:
    """Map lo ≤ i − j ≤ hi onto the kernel: causal with the query offset d = −lo (0 for
    top-left, Lk − Lq for bottom-right), window W = hi + d + 1."""
    if keep.lo is None:
        if keep.hi is not None:
            return None  # a window with no causal bound: not a kernel mode
        return MaskPlan(False, 0, False, keep.padding, fill)
    offset = -keep.lo
    if known_equal(offset, 0):
        bottom_right = False
    elif known_equal(offset, lk - lq):
        bottom_right = True
    else:
        return None
    window = 0
    if keep.hi is not None:
        window = keep.hi + offset + 1
        if not isinstance(window, int) or window <= 0:
            return None
    return MaskPlan(True, window, bottom_right, keep.padding, fill)
