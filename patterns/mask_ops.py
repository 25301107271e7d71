"""Models of the ops a mask is built with, on abstract values (patterns/mask_algebra.py): each exact,
with every argument the op takes, or `Unknown`.

Elementwise ops on piecewise-constant tensors are computed by torch itself on one element per
combination of pieces (shaped as the operands, so type promotion is the op's own); positions
(`arange` and its integer arithmetic) are affine functions of the coordinates; views are maps of
coordinates; writes replace the value on the region they write.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fuser.patterns.mask_algebra import Affine, Ge, Lin, Pieces, Unknown, atom, both, broadcast_mapping, negation
from fuser.patterns.nodes import arguments, known_equal, known_true, literal, tensor_meta

INTEGERS = (torch.int64, torch.int32)
FACTORY_KWARGS = {"dtype", "device", "layout", "requires_grad", "pin_memory", "memory_format", "out", "size"}
FILLS = {"ones": 1, "zeros": 0, "ones_like": 1, "zeros_like": 0, "new_ones": 1, "new_zeros": 0}
FILL_AT = {"full": 1, "full_like": 1, "new_full": 2, "tensor": 0, "scalar_tensor": 0}
UNINITIALIZED = {"empty", "empty_like", "new_empty"}
_BINARY, _UNARY = ("input", "other"), ("input",)
# elementwise ops: parameters (as `arguments` binds them) and defaults; the value on each piece is torch's own
ELEMENTWISE: dict[str, tuple[tuple[str, ...], dict]] = {
    **{name: (_BINARY, {}) for name in (
        "mul", "truediv", "floordiv", "floor_divide", "remainder", "maximum", "minimum", "eq", "ne", "lt", "le", "gt",
        "ge", "and_", "or_", "xor", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
        "bitwise_xor", "__and__", "__or__", "__xor__", "iand", "ior", "ixor", "__iand__", "__ior__", "__ixor__",
        "logical_and_", "logical_or_", "logical_xor_", "bitwise_and_", "bitwise_or_", "bitwise_xor_", "mul_", "div_")},
    **{name: (_UNARY, {}) for name in ("sqrt", "rsqrt", "reciprocal", "neg", "abs", "invert", "__invert__",
                                        "logical_not", "bitwise_not", "logical_not_", "bitwise_not_", "neg_", "zero_")},
    **{name: (("input", "other", "alpha"), {"alpha": 1}) for name in ("add", "sub", "rsub", "add_", "sub_")},
    "div": (("input", "other", "rounding_mode"), {"rounding_mode": None}), "pow": (("input", "exponent"), {}),
    "where": (("condition", "input", "other"), {}),
    "masked_fill": (("input", "mask", "value"), {}), "masked_fill_": (("input", "mask", "value"), {}),
    "clamp": (("input", "min", "max"), {"min": None, "max": None}), "fill_": (("input", "value"), {}),
    "copy_": (("input", "src", "non_blocking"), {"non_blocking": False}),
}
OVERWRITES = {"fill_", "zero_", "copy_"}  # in-place ops whose result does not depend on the old value
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}
AFFINE_ARITHMETIC = {**{name: (("input", "other", "alpha"), {"alpha": 1}) for name in ("add", "sub", "rsub")},
                     "mul": (_BINARY, {}), "neg": (_UNARY, {})}
CASTS = {"to", "type", "bool", "float", "half", "double", "bfloat16", "int", "long"}
UNIT_AXES = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze"}
VIEWS = {"getitem", "view", "view_as", "expand", "expand_as", "broadcast_to", "unsqueeze", "squeeze", "transpose",
          "swapaxes", "swapdims", "permute", "t", "detach", "alias"}
MAYBE_VIEWS = {"reshape", "reshape_as", "flatten", "unflatten", "contiguous"} | CASTS  # a view or a copy


def number(arg: Any) -> Any:
    """An argument the elementwise ops take as is (a Python literal), or Unknown."""
    if isinstance(arg, fx.Node) or isinstance(arg, (list, tuple, dict)):
        raise Unknown(f"{arg!r} is not a literal")
    return arg


def integer(arg: Any) -> Any:
    value = literal(arg, (int,))
    if value is None:
        raise Unknown(f"{arg!r} is not an integer")
    return value


def _index(i: Any, size: Any) -> Any:
    if known_true(i >= 0):
        return i
    if known_true(i < 0):
        return size + i
    raise Unknown("an index of unknown sign")


def _entries(selector: Any, rank: int) -> list:
    """A basic index as one entry per consumed dim or new axis (None), Ellipsis expanded."""
    entries = list(selector) if isinstance(selector, tuple) else [selector]
    if any(tensor_meta(e) is not None for e in entries) or entries.count(Ellipsis) > 1:
        raise Unknown("not a basic index")
    fill = [slice(None)] * (rank - sum(e is not None and e is not Ellipsis for e in entries))
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        return entries[:at] + fill + entries[at + 1:]
    return entries + fill


def _index_mapping(selector: Any, source: tuple, shape: tuple) -> list[Lin]:
    """Source coordinates of `source[selector]` as functions of the result's coordinates."""
    mapping, out_dim = [], 0
    for entry in _entries(selector, len(source)):
        if entry is None:
            out_dim += 1
            continue
        size = source[len(mapping)]
        if isinstance(entry, slice):
            step = 1 if entry.step is None else integer(entry.step)
            if entry.stop is not None:
                integer(entry.stop)
            start = 0 if entry.start is None else integer(entry.start)
            if not (isinstance(step, int) and step > 0):
                raise Unknown("a slice step that is not a positive integer")
            if known_true(start < 0):  # counted from the end, clamped at 0
                start = size + start if known_true(size + start >= 0) else 0 if known_true(size + start <= 0) else None
            elif not (known_true(start >= 0) and (known_true(start <= size) or known_true(shape[out_dim] == 0))):
                start = None
            if start is None:
                raise Unknown("a slice start that may be clamped")
            mapping.append(Lin(start, {out_dim: step}))
            out_dim += 1
        else:
            mapping.append(Lin(_index(integer(entry), size)))
    if out_dim != len(shape) or len(mapping) != len(source):
        raise Unknown("an index that does not give the recorded shape")
    return mapping


def selected(selector: Any, shape: tuple) -> frozenset:
    """The region `x[selector] = ...` writes, as one conjunction on x's coordinates."""
    literals, dim = set(), 0
    for entry in _entries(selector, len(shape)):
        if entry is None:
            continue
        size = shape[dim]
        if isinstance(entry, slice):
            if entry.step not in (None, 1):
                raise Unknown("a strided write")
            # x ≥ start and x < stop, each counted from the end when negative: clamping them to [0, size]
            # changes no coordinate of the tensor
            if entry.start is not None:
                literals.add(Lin(-_index(integer(entry.start), size), {dim: 1}))
            if entry.stop is not None:
                literals.add(Lin(_index(integer(entry.stop), size) - 1, {dim: -1}))
        else:
            i = _index(integer(entry), size)
            literals |= {Lin(-i, {dim: 1}), Lin(i, {dim: -1})}
        dim += 1
    return frozenset({frozenset(Ge(f) for f in literals)})


def _unit_axes_mapping(source: tuple, shape: tuple) -> list[Lin]:
    """A reshape that only adds or drops size-1 axes: the other axes keep their order and sizes."""
    kept = [d for d, s in enumerate(shape) if not known_true(s == 1)]
    mapping, position = [], 0
    for size in source:
        if known_true(size == 1):
            mapping.append(Lin(0))
        elif position < len(kept) and known_equal(size, shape[kept[position]]):
            mapping.append(Lin.coord(kept[position]))
            position += 1
        else:
            raise Unknown("a reshape that merges or splits axes")
    if position != len(kept):
        raise Unknown("a reshape that merges or splits axes")
    return mapping


def _dim(dim: Any, rank: int) -> int:
    dim = integer(dim)
    if not isinstance(dim, int) or not -rank <= dim < rank:
        raise Unknown("a dim out of range")
    return dim % rank


def view_mapping(node: fx.Node, name: str, source: tuple, shape: tuple) -> list[Lin]:
    """Source coordinates of a view (or a same-dtype cast) as functions of the result's coordinates."""
    identity = [Lin.coord(d) for d in range(len(source))]
    if name == "getitem":
        return _index_mapping(node.args[1], source, shape)
    if name in ("expand", "expand_as", "broadcast_to"):
        return broadcast_mapping(source, shape)
    if name == "unsqueeze":
        bound = arguments(node, ("input", "dim"))
        if bound is None:
            raise Unknown("unsqueeze without a dim")
        at = _dim(bound["dim"], len(shape))
        return [Lin.coord(d if d < at else d + 1) for d in range(len(source))]
    if name in UNIT_AXES:
        return _unit_axes_mapping(source, shape)
    if name in ("transpose", "swapaxes", "swapdims"):
        if len(node.args) != 3 or node.kwargs:
            raise Unknown("a transpose spelled with keywords")
        d0, d1 = (_dim(d, len(source)) for d in node.args[1:])
        identity[d0], identity[d1] = Lin.coord(d1), Lin.coord(d0)
        return identity
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        dims = [_dim(d, len(source)) for d in dims]
        if node.kwargs or sorted(dims) != list(range(len(source))):
            raise Unknown("not a permutation")
        for out_dim, d in enumerate(dims):
            identity[d] = Lin.coord(out_dim)
        return identity
    if name == "t":
        return identity[::-1]
    return identity  # contiguous, detach, alias, a cast to the dtype it has


def standin(v: Any, value: Pieces) -> torch.Tensor:
    """One element of `value`, shaped so type promotion treats it as the tensor (a 0-d tensor counts less)."""
    t = torch.tensor(v, dtype=value.dtype)
    return t if len(value.shape) == 0 else t.reshape(1)


def call(node: fx.Node, params: tuple[str, ...], replacements: dict[str, Any]) -> Any:
    """`node`'s op called as the graph calls it, with some arguments replaced."""
    args = [replacements.get(p, a) for p, a in zip(params, node.args)]
    kwargs = {k: replacements.get(k, a) for k, a in node.kwargs.items() if k != "out"}
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def one_element(result: Any, dtype: torch.dtype) -> Any:
    if not isinstance(result, torch.Tensor) or result.numel() != 1 or result.dtype != dtype:
        raise Unknown("an elementwise op that does not give the recorded dtype")
    return result.item()


def triangle(upper: bool, base: Pieces, diagonal: Any) -> Pieces:
    """`triu(x, d)` keeps j − i ≥ d, `tril(x, d)` keeps j − i ≤ d; zero elsewhere."""
    shape = base.shape
    if len(shape) < 2:
        raise Unknown("triu/tril of fewer than two dims")
    i, j = len(shape) - 2, len(shape) - 1
    kept = atom(Lin(-diagonal, {j: 1, i: -1}) if upper else Lin(diagonal, {i: 1, j: -1}))
    zero = torch.zeros((), dtype=base.dtype).item()
    return Pieces.of(shape, base.dtype, [(both(r, kept, shape), v) for r, v in base.pieces]
                     + [(negation(kept, shape), zero)])


def overwritten(old: Pieces, region: frozenset, v: Any) -> Pieces:
    return Pieces.of(old.shape, old.dtype, [(both(r, negation(region, old.shape), old.shape), w) for r, w in old.pieces]
                     + [(region, v)])


def constant(node: fx.Node, name: str, shape: tuple, dtype: torch.dtype) -> Pieces:
    """`ones` / `zeros` / `full` (their `_like` and `new_` forms), `tensor(number)`: one value everywhere."""
    if set(node.kwargs) - FACTORY_KWARGS - {"fill_value", "data", "s", "input"}:
        raise Unknown(f"{name} with other arguments")
    if name in FILLS:
        fill = FILLS[name]
    else:
        at = FILL_AT[name]
        fill = node.args[at] if len(node.args) > at else node.kwargs.get({"tensor": "data", "scalar_tensor": "s"}.get(
            name, "fill_value"))
    fill = number(fill)
    if not isinstance(fill, (bool, int, float)):
        raise Unknown(f"{name} of {fill!r}")
    try:
        return Pieces.constant(shape, dtype, torch.full((), fill, dtype=dtype).item())
    except (RuntimeError, TypeError) as error:
        raise Unknown(f"{name}: {error}") from error


def arange(node: fx.Node, shape: tuple, dtype: torch.dtype) -> Affine:
    """`arange(end)`, `arange(start, end, step)`, any of them by keyword: start + step · x."""
    names = ("start", "end", "step")
    if set(node.kwargs) - FACTORY_KWARGS - set(names) or len(node.args) > 3:
        raise Unknown("arange with other arguments")
    if len(node.args) == 1 and not set(names) & set(node.kwargs):
        bound = {"end": node.args[0]}
    else:
        bound = dict(zip(names, node.args))
        if set(bound) & set(node.kwargs):
            raise Unknown("arange with an argument given twice")
        bound.update({k: v for k, v in node.kwargs.items() if k in names})
    if "end" not in bound:
        raise Unknown("arange without an end")
    start, step = integer(bound.get("start", 0)), integer(bound.get("step", 1))
    integer(bound["end"])
    if dtype not in INTEGERS or not isinstance(step, int):
        raise Unknown("arange of other than integers")
    return Affine(shape, dtype, Lin(start, {0: step}).on_box(shape))


def positions(name: str, operands: dict[str, Any], shape: tuple, dtype: torch.dtype) -> Any:
    """Integer arithmetic (+, −, × by an integer, −x) and comparisons of positions, exact in integers."""
    def linear(v: Any) -> Lin:
        if isinstance(v, Affine) and v.dtype in INTEGERS:
            return v.f.substitute(broadcast_mapping(v.shape, shape))
        if isinstance(v, Pieces) and len(v.pieces) == 1 and type(v.pieces[0][1]) is int:
            return Lin(v.pieces[0][1])
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            return Lin(v)
        raise Unknown(f"{v!r} is not an integer position")

    if name in COMPARISONS:
        if dtype != torch.bool:
            raise Unknown("a comparison that is not boolean")
        d = linear(operands["input"]).plus(linear(operands["other"]), -1)  # a − b
        equal = frozenset({frozenset({Ge(d), Ge(d.times(-1))})})
        region = {"le": atom(d.times(-1)), "lt": atom(d.times(-1).shift(-1)), "ge": atom(d), "gt": atom(d.shift(-1)),
                  "eq": equal, "ne": negation(equal, shape)}[name]
        return Pieces.of(shape, torch.bool, [(region, True), (negation(region, shape), False)])
    if dtype not in INTEGERS or name not in AFFINE_ARITHMETIC:
        raise Unknown(f"{name} of positions")
    a = linear(operands["input"])
    if name == "neg":
        return Affine(shape, dtype, a.times(-1).on_box(shape))
    b = linear(operands["other"])
    if name == "mul":
        factor, other = (b, a) if not b.coeffs else (a, b)
        if factor.coeffs or (other.coeffs and not isinstance(factor.const, int)):
            raise Unknown("a product of positions")
        f = other.times(factor.const) if other.coeffs else Lin(a.const * b.const)
    else:
        alpha = operands["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int):
            raise Unknown("a non-integer alpha")
        f = b.plus(a, -alpha) if name == "rsub" else a.plus(b, alpha if name == "add" else -alpha)
    return Affine(shape, dtype, f.on_box(shape))
