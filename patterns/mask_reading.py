"""Reading a mask's value off the graph: each node's abstract value (patterns/mask_algebra.py) when a
given node reads it.

The graph is not functionalized, so a node's value is its value *when it is read*: what its op made,
then every write into its storage before the read (setitem, `masked_fill_`, `fill_diagonal_`, `triu_`,
`&=`, `out=`, ...), each modeled exactly too. A write through another alias (a view, a reshape that
may or may not copy) or one not modeled makes the value not understood (`Unknown`). A boolean tensor
that is not understood and that nothing writes into after it is made is a `Cell`: read as it is.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import fx

from fuser.patterns.mask_algebra import (TRUE, Affine, Cell, Ge, Lin, Pieces, Unknown, both, broadcast_mapping,
                                         negation, remapped)
from fuser.patterns.mask_ops import (AFFINE_ARITHMETIC, CASTS, ELEMENTWISE, FACTORY_KWARGS, FILL_AT, FILLS,
                                     INTEGERS, MAYBE_VIEWS, OVERWRITES, UNINITIALIZED, VIEWS, arange, call,
                                     constant, integer, number, one_element, overwritten, positions, selected,
                                     standin, triangle, view_mapping)
from fuser.patterns.nodes import (alias_class, arguments, known_equal, known_true, op_name, returned_target,
                                  tensor_meta, written, writers)


class MaskReader:
    """The abstract values of one graph's nodes, as read at a given position (index in graph order)."""

    def __init__(self, graph: fx.Graph):
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self._values: dict[tuple[fx.Node, int], Any] = {}
        self._classes: dict[fx.Node, set[fx.Node]] = {}
        self._depth = 0

    def writes(self, node: fx.Node, until: float) -> list[fx.Node]:
        """The writes into `node`'s storage (through any alias) after it is made and before `until`."""
        if node not in self._classes:
            self._classes[node] = alias_class(node)
        start = self.position[node]
        return sorted((w for w in writers(self._classes[node]) if start < self.position[w] < until),
                      key=self.position.__getitem__)

    def at(self, node: Any, when: int) -> Any:
        """The value `node` has when the node at position `when` reads it: Affine, Pieces or a literal."""
        if not isinstance(node, fx.Node):
            return node
        if tensor_meta(node) is None:
            return integer(node)
        key = (node, len(self.writes(node, when)))  # what it reads is fixed by the writes before it
        if key not in self._values:
            self._depth += 1
            try:
                if self._depth > 200:
                    raise Unknown("a mask built by too many ops")
                self._values[key] = self._read(node, when)
            except Unknown:
                self._values[key] = self._cell(node)
            finally:
                self._depth -= 1
        if self._values[key] is None:
            raise Unknown(f"{node.name} is not understood")
        return self._values[key]

    def _cell(self, node: fx.Node) -> Pieces | None:
        """A boolean tensor read as it is, if nothing writes into it after it is made."""
        meta = tensor_meta(node)
        if meta.dtype != torch.bool or self.writes(node, float("inf")):
            return None
        shape = tuple(meta.shape)
        cell = Cell(node, tuple(Lin(0) if known_true(s == 1) else Lin.coord(d) for d, s in enumerate(shape)))
        return Pieces.of(shape, torch.bool, [(frozenset({frozenset({cell})}), True),
                                             (frozenset({frozenset({cell.negated()})}), False)])

    def _read(self, node: fx.Node, when: int) -> Any:
        name, meta = op_name(node), tensor_meta(node)
        if returned_target(node) is not None:  # an in-place op or `out=` returns the tensor it wrote
            return self.at(returned_target(node), when)
        if self._is_view(node, name):
            if not node.args:
                raise Unknown(f"{name} with its input by keyword")
            source = self.at(node.args[0], when)
            if name in MAYBE_VIEWS and self.writes(node, when):
                raise Unknown("a write after a reshape or cast that may or may not copy")
            shape = tuple(meta.shape)
            return remapped(source, view_mapping(node, name, source.shape, shape), shape)
        value = None if name in UNINITIALIZED else self._compute(node)
        for write in self.writes(node, when):
            if any(self._root(t) is not node for t in written(write)):
                raise Unknown(f"{write.name} writes into {node.name} through another alias")
            value = self._write(write, tensor_meta(node), value)
        if value is None:
            raise Unknown(f"{node.name} is not initialized")
        return value

    @staticmethod
    def _root(node: fx.Node) -> fx.Node:
        """The tensor an in-place op's (or `out=` op's) result is."""
        while returned_target(node) is not None:
            node = returned_target(node)
        return node

    def _is_view(self, node: fx.Node, name: str | None) -> bool:
        if name == "getitem":
            selector = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            return not any(tensor_meta(e) is not None for e in selector)
        if name in CASTS:  # a cast to the dtype it has returns its input
            source = tensor_meta(node.args[0]) if node.args else None
            return source is not None and source.dtype == tensor_meta(node).dtype and not node.kwargs.get("copy")
        return name in VIEWS or name in MAYBE_VIEWS

    def _compute(self, node: fx.Node) -> Any:
        """The value an op makes (its inputs read where it runs), `out=` aside."""
        name, meta = op_name(node), tensor_meta(node)
        shape, dtype, when = tuple(meta.shape), meta.dtype, self.position[node]
        if name in FILLS or name in FILL_AT:
            return constant(node, name, shape, dtype)
        if name == "arange":
            return arange(node, shape, dtype)
        if name == "eye":
            if set(node.kwargs) - FACTORY_KWARGS or len(shape) != 2:
                raise Unknown("eye with other arguments")
            diagonal = frozenset({frozenset({Ge(Lin(0, {0: 1, 1: -1})), Ge(Lin(0, {0: -1, 1: 1}))})})
            one, zero = (torch.full((), v, dtype=dtype).item() for v in (1, 0))
            return Pieces.of(shape, dtype, [(diagonal, one), (negation(diagonal, shape), zero)])
        if name == "getitem":
            return self._gather(node, shape)
        if name in ("triu", "tril"):
            bound = arguments(node, ("input", "diagonal", "out"), {"diagonal": 0, "out": None})
            if bound is None:
                raise Unknown(f"{name} with other arguments")
            return triangle(name == "triu", self._pieces(bound["input"], when), integer(bound["diagonal"]))
        if name == "clone":
            bound = arguments(node, ("input", "memory_format"), {"memory_format": None})
            if bound is None:
                raise Unknown("clone with other arguments")
            return self.at(bound["input"], when)
        if name in CASTS:
            return self._cast(node, dtype, when)
        return self._elementwise(node, name, shape, dtype, when)

    def _pieces(self, node: Any, when: int) -> Pieces:
        """A tensor's value as pieces (a constant position tensor is one piece)."""
        v = self.at(node, when)
        if isinstance(v, Affine) and not v.f.coeffs and isinstance(v.f.const, int):
            return Pieces.constant(v.shape, v.dtype, v.f.const)
        if not isinstance(v, Pieces):
            raise Unknown("not a piecewise constant tensor")
        return v

    def _cast(self, node: fx.Node, dtype: torch.dtype, when: int) -> Any:
        if set(node.kwargs) - {"dtype", "device", "non_blocking", "copy", "memory_format"}:
            raise Unknown("a cast with other arguments")
        source = self.at(node.args[0], when)
        if isinstance(source, Affine):
            if dtype not in INTEGERS:
                raise Unknown("positions cast to a non-integer dtype")
            return Affine(source.shape, dtype, source.f)
        return Pieces.of(source.shape, dtype, [(r, torch.tensor(v, dtype=source.dtype).to(dtype).item())
                                               for r, v in source.pieces])

    def _gather(self, node: fx.Node, shape: tuple) -> Any:
        """`table[rows, cols]` with position tensors as indices, each provably in range."""
        when, source = self.position[node], tensor_meta(node.args[0])
        selector = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(selector) != source.dim():
            raise Unknown("advanced indexing mixed with slices")
        mapping = []
        for entry, size in zip(selector, source.shape):
            index = self.at(entry, when)
            if not isinstance(index, Affine):
                raise Unknown("an index tensor that is not positions")
            f = index.f.substitute(broadcast_mapping(index.shape, shape)).on_box(shape)
            lo, hi = f.bounds(shape)
            if not (known_true(lo >= 0) and known_true(hi <= size - 1)):
                raise Unknown("an index that may be out of range")
            mapping.append(f)
        return remapped(self.at(node.args[0], when), mapping, shape)

    def _operand(self, arg: Any, when: int) -> Any:
        return self.at(arg, when) if isinstance(arg, fx.Node) else number(arg)

    def _elementwise(self, node: fx.Node, name: str | None, shape: tuple, dtype: torch.dtype, when: int,
                     old: Pieces | None = None) -> Any:
        """An elementwise op: integer arithmetic and comparisons of positions, or torch's own result on
        one element of each combination of its operands' pieces (`old`: an in-place op's target)."""
        params, defaults = ELEMENTWISE.get(name) or AFFINE_ARITHMETIC.get(name) or ((), {})
        bound = arguments(node, params + ("out",), {**defaults, "out": None}) if params else None
        if bound is None:
            raise Unknown(f"{name} is not modeled")
        operands = {p: old if old is not None and p == params[0] else self._operand(a, when)
                    for p, a in bound.items() if p != "out"}
        if any(isinstance(v, Affine) or isinstance(v, torch.SymInt) for v in operands.values()):
            return positions(name, operands, shape, dtype)
        tensors = [p for p, v in operands.items() if isinstance(v, Pieces)]
        aligned = [remapped(operands[p], broadcast_mapping(operands[p].shape, shape), shape).pieces for p in tensors]
        pairs = []
        for combination in itertools.product(*aligned):
            region = TRUE
            for r, _ in combination:
                region = both(region, r, shape)
            if region:
                standins = {p: standin(v, operands[p]) for p, (_, v) in zip(tensors, combination)}
                try:
                    pairs.append((region, one_element(call(node, params, standins), dtype)))
                except (RuntimeError, TypeError, ValueError) as error:
                    raise Unknown(f"{name} on one element: {error}") from error
        return Pieces.of(shape, dtype, pairs)

    def _write(self, write: fx.Node, target: torch.Tensor, old: Any) -> Any:
        """The value of a tensor (example value `target`) after `write` writes into it (`old`: its value
        before, None if uninitialized)."""
        name, when = op_name(write), self.position[write]
        out = write.kwargs.get("out")
        if isinstance(out, fx.Node):  # the whole tensor becomes the op's value
            value = self._compute(write)
            if value.dtype != tensor_meta(out).dtype or len(value.shape) != tensor_meta(out).dim() or \
                    not all(known_equal(a, b) for a, b in zip(value.shape, tensor_meta(out).shape)):
                raise Unknown("an out= tensor of another shape or dtype")
            return value
        shape, dtype = tuple(target.shape), target.dtype
        if old is None and name in OVERWRITES:
            old = Pieces.constant(shape, dtype, torch.zeros((), dtype=dtype).item())
        if not isinstance(old, Pieces):
            raise Unknown(f"{name} into a tensor that is not piecewise constant")
        if name == "setitem":
            v = write.args[2]
            if isinstance(v, fx.Node):
                pieces = self._pieces(v, when)
                if len(pieces.pieces) != 1:
                    raise Unknown("setitem of a tensor that is not one value")
                v = standin(pieces.pieces[0][1], pieces)
            element = torch.zeros(1, dtype=dtype)
            element[0] = number(v) if not isinstance(v, torch.Tensor) else v
            return overwritten(old, selected(write.args[1], shape), element.item())
        if name in ("triu_", "tril_"):
            bound = arguments(write, ("input", "diagonal"), {"diagonal": 0})
            if bound is None:
                raise Unknown(f"{name} with other arguments")
            return triangle(name == "triu_", old, integer(bound["diagonal"]))
        if name == "fill_diagonal_":
            bound = arguments(write, ("input", "fill_value", "wrap"), {"wrap": False})
            if bound is None or len(shape) < 2 or not all(known_equal(s, shape[0]) for s in shape[2:]) or \
                    (bound["wrap"] and not known_true(shape[0] <= shape[1])):
                raise Unknown("fill_diagonal_ that wraps")
            diagonal = frozenset({frozenset(g for d in range(1, len(shape))
                                            for g in (Ge(Lin(0, {0: 1, d: -1})), Ge(Lin(0, {0: -1, d: 1}))))})
            return overwritten(old, diagonal, torch.zeros(1, dtype=dtype).fill_(number(bound["fill_value"])).item())
        if name in ELEMENTWISE:
            return self._elementwise(write, name, shape, dtype, when, old)
        raise Unknown(f"{name} writes into a mask")
