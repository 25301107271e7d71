"""The exact algebra masks are recognized in: integer affine functions of a tensor's coordinates,
and regions of coordinates as unions of conjunctions of literals.

A tensor's coordinates are x_0 … x_{n-1} (0 ≤ x_d < size_d). A literal is `Ge(f)`: f(x) ≥ 0 for an
integer affine f (so its negation is −f − 1 ≥ 0, exactly), or `Cell(node, indices, positive)`: the
boolean tensor `node` at coordinates indices(x) is `positive` (a padding table, read as it is).
An abstract tensor is `Affine` (an integer tensor whose value is f(x): `arange` and its arithmetic)
or `Pieces` (finitely many constant values, each on a region; booleans are two pieces). Nothing here
approximates: what cannot be represented raises `Unknown`, and the caller reads the mask as a tensor.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

from fuser.patterns.nodes import known_true

MAX_TERMS = 48


class Unknown(Exception):
    """A value the algebra cannot represent exactly."""


def _const(c: Any) -> Any:
    if isinstance(c, bool) or not isinstance(c, (int, torch.SymInt)):
        raise Unknown(f"{c!r} is not an integer")
    if isinstance(c, torch.SymInt):
        expr = c.node.expr
        return int(expr) if expr.is_number else c
    return int(c)


def _key(c: Any) -> Any:
    return c if isinstance(c, int) else ("sym", c.node.expr)


class Lin:
    """const + Σ coeff_d · x_d, integer coefficients, an integer or symbolic constant."""
    __slots__ = ("const", "coeffs")

    def __init__(self, const: Any = 0, coeffs: Any = ()):
        self.const = _const(const)
        coeffs = dict(coeffs)
        if any(isinstance(c, bool) or not isinstance(c, int) for c in coeffs.values()):
            raise Unknown("a coefficient that is not an integer")
        self.coeffs = tuple(sorted((d, c) for d, c in coeffs.items() if c != 0))

    @staticmethod
    def coord(dim: int, scale: int = 1) -> "Lin":
        return Lin(0, {dim: scale})

    def key(self) -> tuple:
        return _key(self.const), self.coeffs

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Lin) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return " + ".join([f"{c}·x{d}" for d, c in self.coeffs] + [str(self.const)])

    def plus(self, other: "Lin", scale: int = 1) -> "Lin":
        coeffs = dict(self.coeffs)
        for d, c in other.coeffs:
            coeffs[d] = coeffs.get(d, 0) + scale * c
        return Lin(self.const + scale * other.const, coeffs)

    def shift(self, c: Any) -> "Lin":
        return Lin(self.const + c, self.coeffs)

    def times(self, k: int) -> "Lin":
        return Lin(self.const * k, {d: c * k for d, c in self.coeffs})

    def substitute(self, mapping: Sequence["Lin"]) -> "Lin":
        """This function with x_d replaced by mapping[d] (a function of other coordinates)."""
        result = Lin(self.const)
        for d, c in self.coeffs:
            result = result.plus(mapping[d], c)
        return result

    def on_box(self, shape: Sequence[Any]) -> "Lin":
        """The same function on a tensor of `shape`: a coordinate of a size-1 dim is 0."""
        return Lin(self.const, {d: c for d, c in self.coeffs if not known_true(shape[d] == 1)})

    def bounds(self, shape: Sequence[Any]) -> tuple[Any, Any]:
        """(min, max) over the coordinates of a tensor of `shape`."""
        lo = hi = self.const
        for d, c in self.coeffs:
            if c < 0:
                lo = lo + c * (shape[d] - 1)
            else:
                hi = hi + c * (shape[d] - 1)
        return lo, hi


@dataclass(frozen=True)
class Ge:
    """f(x) ≥ 0."""
    f: Lin

    def negated(self) -> "Ge":
        return Ge(self.f.times(-1).shift(-1))

    def substitute(self, mapping: Sequence[Lin]) -> "Ge":
        return Ge(self.f.substitute(mapping))


@dataclass(frozen=True)
class Cell:
    """The boolean tensor `node` at coordinates indices(x) is `positive`."""
    node: fx.Node
    indices: tuple[Lin, ...]
    positive: bool = True

    def negated(self) -> "Cell":
        return Cell(self.node, self.indices, not self.positive)

    def substitute(self, mapping: Sequence[Lin]) -> "Cell":
        return Cell(self.node, tuple(i.substitute(mapping) for i in self.indices), self.positive)


TRUE = frozenset({frozenset()})
FALSE: frozenset = frozenset()


def _normalized(f: Lin) -> Lin:
    """g·h + c ≥ 0 is h + ⌊c/g⌋ ≥ 0 (integers), so equal constraints look equal."""
    g = math.gcd(*(abs(c) for _, c in f.coeffs)) if f.coeffs else 1
    if g <= 1 or not isinstance(f.const, int):
        return f
    return Lin(f.const // g, {d: c // g for d, c in f.coeffs})


def _term(term: frozenset, shape: Sequence[Any]) -> frozenset | None:
    """A conjunction simplified on the box of `shape`: literals true everywhere dropped, the tighter of
    two bounds on one function kept, None where it is provably empty."""
    bounds: dict[tuple, list] = {}
    cells = set()
    for lit in term:
        if isinstance(lit, Cell):
            cells.add(Cell(lit.node, tuple(i.on_box(shape) for i in lit.indices), lit.positive))
            continue
        f = _normalized(lit.f.on_box(shape))
        lo, hi = f.bounds(shape)
        if known_true(lo >= 0):
            continue
        if known_true(hi < 0):
            return None
        kept = bounds.setdefault(f.coeffs, [])
        if not any(known_true(k <= f.const) for k in kept):
            kept[:] = [k for k in kept if not known_true(f.const <= k)] + [f.const]
    for coeffs, consts in bounds.items():
        opposite = bounds.get(tuple((d, -c) for d, c in coeffs), [])
        if any(known_true(a + b < 0) for a in consts for b in opposite):
            return None
    if any(cell.negated() in cells for cell in cells):
        return None
    return frozenset(Ge(Lin(c, coeffs)) for coeffs, consts in bounds.items() for c in consts) | cells


def _interval(literals: frozenset) -> tuple | None:
    """(v, lo, hi) when `literals` bound one function v·x: lo ≤ v·x ≤ hi (None: unbounded); else None."""
    direction, lo, hi = None, None, None
    for lit in literals:
        if not isinstance(lit, Ge) or not lit.f.coeffs:
            return None
        v = lit.f.coeffs if lit.f.coeffs[0][1] > 0 else tuple((d, -c) for d, c in lit.f.coeffs)
        if direction not in (None, v):
            return None
        direction = v
        if v == lit.f.coeffs:   # v·x + c ≥ 0: v·x ≥ −c
            if lo is not None:
                return None
            lo = -lit.f.const
        else:                   # −v·x + c ≥ 0: v·x ≤ c
            if hi is not None:
                return None
            hi = lit.f.const
    return direction, lo, hi


def _extreme(a: Any, b: Any, lower: bool) -> Any:
    """The outer of two bounds of a union (None: unbounded), or Unknown when they do not compare."""
    if a is None or b is None:
        return None
    if known_true(a <= b):
        return a if lower else b
    if known_true(b <= a):
        return b if lower else a
    raise Unknown("bounds that do not compare")


def _union(s: frozenset, t: frozenset) -> frozenset | None:
    """One conjunction equal to s ∪ t, when they differ only in bounds on one function that overlap or touch."""
    common = s & t
    a, b = _interval(s - common), _interval(t - common)
    if a is None or b is None or a[0] != b[0]:
        return None
    (v, lo1, hi1), (_, lo2, hi2) = a, b
    if not all(h is None or lo is None or known_true(lo <= h + 1) for lo, h in ((lo2, hi1), (lo1, hi2))):
        return None
    try:
        lo, hi = _extreme(lo1, lo2, lower=True), _extreme(hi1, hi2, lower=False)
    except Unknown:
        return None
    bounds = ({Ge(Lin(-lo, v))} if lo is not None else set()) | \
        ({Ge(Lin(hi, {d: -c for d, c in v}))} if hi is not None else set())
    return common | frozenset(bounds)


def simplify(region: frozenset, shape: Sequence[Any]) -> frozenset:
    """A union of conjunctions simplified on the box of `shape`: empty ones dropped, one implied by
    another dropped, two that are intervals of one function merged."""
    terms = {t for t in (_term(t, shape) for t in region) if t is not None}
    merged = True
    while merged and len(terms) > 1:
        merged = False
        for s, t in itertools.combinations(terms, 2):
            union = s if s <= t else t if t <= s else _union(s, t)
            if union is not None:
                terms = (terms - {s, t}) | {union}
                merged = True
                break
    if frozenset() in terms:
        return TRUE
    if len(terms) > MAX_TERMS:
        raise Unknown("too many terms")
    return frozenset(terms)


def both(a: frozenset, b: frozenset, shape: Sequence[Any]) -> frozenset:
    if len(a) * len(b) > MAX_TERMS * MAX_TERMS:
        raise Unknown("too many terms")
    return simplify(frozenset(s | t for s in a for t in b), shape)


def either(a: frozenset, b: frozenset, shape: Sequence[Any]) -> frozenset:
    return simplify(a | b, shape)


def negation(region: frozenset, shape: Sequence[Any]) -> frozenset:
    result = TRUE
    for term in region:
        result = both(result, frozenset(frozenset({lit.negated()}) for lit in term), shape)
    return result


def atom(f: Lin) -> frozenset:
    return frozenset({frozenset({Ge(f)})})


def _substituted(region: frozenset, mapping: Sequence[Lin], shape: Sequence[Any]) -> frozenset:
    return simplify(frozenset(frozenset(lit.substitute(mapping) for lit in term) for term in region), shape)


def value_key(v: Any) -> tuple:
    """Values equal as tensor elements compare equal; 0.0 and −0.0 do not (1/x tells them apart)."""
    if isinstance(v, float):
        return ("nan",) if math.isnan(v) else ("float", v, math.copysign(1.0, v))
    return (type(v).__name__, v)


@dataclass(frozen=True)
class Affine:
    """An integer tensor whose element at x is f(x)."""
    shape: tuple
    dtype: torch.dtype
    f: Lin


@dataclass(frozen=True)
class Pieces:
    """A tensor taking value v on region r for each (r, v) of `pieces` (disjoint, covering the tensor)."""
    shape: tuple
    dtype: torch.dtype
    pieces: tuple

    @staticmethod
    def of(shape: tuple, dtype: torch.dtype, pairs: Sequence[tuple[frozenset, Any]]) -> "Pieces":
        """Pieces from (region, value) pairs, equal values merged and empty regions dropped."""
        merged: dict[tuple, list] = {}
        for region, v in pairs:
            region = simplify(region, shape)
            if region:
                entry = merged.setdefault(value_key(v), [FALSE, v])
                entry[0] = either(entry[0], region, shape)
        return Pieces(shape, dtype, tuple((region, v) for region, v in merged.values()))

    @staticmethod
    def constant(shape: tuple, dtype: torch.dtype, v: Any) -> "Pieces":
        return Pieces(shape, dtype, ((TRUE, v),))

    def where(self, predicate) -> frozenset:
        """The region where the value satisfies `predicate`."""
        region = FALSE
        for r, v in self.pieces:
            if predicate(v):
                region = either(region, r, self.shape)
        return region


def remapped(value: Any, mapping: Sequence[Lin], shape: tuple) -> Any:
    """The same values in another tensor's coordinates: the element at x is the old one at mapping(x)."""
    if isinstance(value, Affine):
        return Affine(shape, value.dtype, value.f.substitute(mapping).on_box(shape))
    return Pieces.of(shape, value.dtype, [(_substituted(r, mapping, shape), v) for r, v in value.pieces])


def broadcast_mapping(source: Sequence[Any], target: Sequence[Any]) -> list[Lin]:
    """Coordinates of a tensor of shape `source` broadcast to `target` (aligned from the right)."""
    offset = len(target) - len(source)
    return [Lin(0) if known_true(size == 1) else Lin.coord(d + offset) for d, size in enumerate(source)]
