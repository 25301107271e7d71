"""Reading the nodes of a torch-level FX graph: example values, literals, arguments, and who writes where.

The graph Dynamo records is not functionalized: `m[:, :4] = False`, `m.masked_fill_(e, True)` and
`torch.ge(a, b, out=m)` write into a tensor another node made, a later reader of that node sees the
written value, and views share their base's storage. What a pattern concludes from how a value was
made (a mask's kind, a literal) holds only if nothing writes into that storage afterwards, or the
write is modeled too: `alias_class` is the storage a node may share, `written` what a node writes.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx


def value(node: Any) -> Any:
    """The example value Dynamo recorded for a node (a FakeTensor, SymInt, ...), or a literal itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_meta(node: Any) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def known_true(condition: Any) -> bool:
    """Whether a (symbolic) condition holds for every size the graph runs with; False when unknown."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    try:
        return bool(statically_known_true(condition))
    except Exception:
        return False


def known_equal(a: Any, b: Any) -> bool:
    return known_true(a == b)


def literal(arg: Any, kinds: tuple[type, ...] = (int, float)) -> Any:
    """The number an argument holds, or None: a Python number of `kinds` (bool only if named), or the
    example value of a node computing a size (a SymInt / SymFloat cannot be written into). A tensor
    is never a literal: its storage can change after it is made."""
    v = value(arg)
    if isinstance(v, bool):
        return v if bool in kinds else None
    symbolic = {int: torch.SymInt, float: torch.SymFloat}
    if isinstance(v, kinds) or any(isinstance(v, symbolic[k]) for k in kinds if k in symbolic):
        return v
    return None


def is_number(arg: Any) -> bool:
    """A Python number (not a bool) given as an argument: a literal of the graph."""
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def symbolic_scalar(node: Any) -> bool:
    """A node computing a number at run time (a SymFloat or SymInt: `torch.compile(dynamic=True)` passes float
    attributes such as `self.scaling` and `eps` as graph inputs, read with `.item()`). Unlike a tensor, nothing
    can write into it after it is computed: the op given it computes with the value the original code used."""
    return isinstance(node, fx.Node) and isinstance(value(node), (torch.SymFloat, torch.SymInt))


_HOMES = (torch, operator, torch.Tensor, F, torch.special)


def op_name(node: Any) -> str | None:
    """One name for an op's method and function spellings (`x.le`, `torch.le`, `operator.le`); None for
    anything else (a function of another library that happens to share a name is not that op)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        if name and any(getattr(home, name, None) is node.target for home in _HOMES):
            return name
    return None


def arguments(node: fx.Node, params: Sequence[str], defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A call's arguments by parameter name, positional or keyword (a method's self is the first
    parameter), defaults filled in; None when the call passes a parameter not in `params`, more
    positional arguments than there are, or leaves out one without a default."""
    if len(node.args) > len(params):
        return None
    bound = dict(zip(params, node.args))
    for key, arg in node.kwargs.items():
        if key not in params or key in bound:
            return None
        bound[key] = arg
    for name, default in (defaults or {}).items():
        bound.setdefault(name, default)
    return bound if all(p in bound for p in params) else None


_DROPOUTS = {F.dropout: (("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False}),
             torch.dropout: (("input", "p", "train"), {})}


def dropout_arguments(node: Any) -> dict[str, Any] | None:
    """`F.dropout(x, p, training, inplace)` / `torch.dropout(x, p, train)`, any spelling, as
    {input, p, training, inplace}; None for another node or arguments these do not take."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _DROPOUTS:
        return None
    params, defaults = _DROPOUTS[node.target]
    bound = arguments(node, params, defaults)
    if bound is None:
        return None
    return {"input": bound["input"], "p": bound["p"], "training": bound[params[2]],
            "inplace": bound.get("inplace", False)}


_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.iand, operator.ior, operator.ixor, operator.isub,
                       operator.imul, operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                       operator.ilshift, operator.irshift, operator.imatmul}
_IN_PLACE_DUNDERS = {f"__{name}__" for name in ("setitem", "iadd", "iand", "ior", "ixor", "isub", "imul", "itruediv",
                                                  "ifloordiv", "imod", "ipow", "ilshift", "irshift", "imatmul")}


def _in_place(node: fx.Node) -> bool:
    """`x.add_(y)`, `torch.relu_(x)`, `x[i] = y`, `x &= y`: the op writes into its first argument."""
    if node.op == "call_function" and (node.target in _IN_PLACE_FUNCTIONS or getattr(operator, getattr(
            node.target, "__name__", ""), None) is node.target):  # operator.and_ is `a & b`, not in place
        return node.target in _IN_PLACE_FUNCTIONS
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and (name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")))


@functools.lru_cache(maxsize=None)
def _signature(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def _inplace_flag(node: fx.Node) -> bool:
    """`F.relu(x, inplace=True)` and its positional spelling `F.dropout(x, 0.1, True, True)`."""
    if node.op != "call_function" or "inplace" not in (getattr(_signature(node.target), "parameters", None) or {}):
        return False
    try:
        bound = _signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return True  # a call its own signature does not take: assume the worst
    return bound.arguments.get("inplace") is True


def _schema(node: fx.Node) -> Any:
    """The schema of a `torch.ops` call (an overload, or a packet with one overload), or None."""
    target = node.target if node.op == "call_function" else None
    if isinstance(target, torch._ops.OpOverloadPacket) and target.overloads() == ["default"]:
        target = target.default
    return target._schema if isinstance(target, torch._ops.OpOverload) else None


def _schema_writes(node: fx.Node) -> list[Any]:
    """The arguments an op's schema marks as written (`aten.add_.Tensor`'s self)."""
    schema = _schema(node)
    if schema is None:
        return []
    return [node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _nodes_in(values: list[Any]) -> tuple[fx.Node, ...]:
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return tuple(dict.fromkeys(found))


def written(node: fx.Node) -> tuple[fx.Node, ...]:
    """The nodes whose tensors `node` writes into: an in-place op's first argument (`_` methods and
    functions, setitem, `x &= y`, `inplace=True`), `out=` tensors, the written arguments of an ATen
    overload; every tensor a module call is given (its code is not in the graph)."""
    if node.op == "call_module":
        return tuple(node.all_input_nodes)
    if node.op not in ("call_function", "call_method"):
        return ()
    targets = [node.kwargs.get("out")] + _schema_writes(node)
    if _in_place(node) or _inplace_flag(node):
        targets.append(node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self")))
    return _nodes_in(targets)


def returned_target(node: fx.Node) -> fx.Node | None:
    """The tensor a writing op returns, which its result then is: an `out=` tensor, an in-place op's
    target (`x.masked_fill_(m, v)` is x); None for other ops and for setitem (it returns nothing)."""
    if node.op not in ("call_function", "call_method"):
        return None
    if isinstance(node.kwargs.get("out"), fx.Node):
        return node.kwargs["out"]
    if _in_place(node) and op_name(node) not in ("setitem", "__setitem__") and node.args and \
            isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def mutates(node: fx.Node) -> bool:
    """Whether a node writes into a tensor (its first argument, an `out=` tensor, ...)."""
    return bool(written(node))


# ops that return a new tensor (never a view of an input) when they write nothing: elementwise math,
# comparisons, reductions, matrix products, factories; any other op may share an input's storage
FRESH = frozenset("""
add sub mul truediv div floordiv floor_divide remainder fmod neg abs pow rsub exp exp2 log log2 sqrt rsqrt sin cos
tanh sigmoid relu gelu silu softplus erf clamp clamp_min clamp_max maximum minimum sign floor ceil round trunc
eq ne lt le gt ge and_ or_ xor invert logical_and logical_or logical_xor logical_not bitwise_and bitwise_or
bitwise_xor bitwise_not __and__ __or__ __xor__ __invert__ __rand__ __ror__ __rxor__ __eq__ __ne__ __lt__ __le__
__gt__ __ge__ isnan isinf isfinite where masked_fill matmul bmm mm linear einsum baddbmm addmm softmax log_softmax
scaled_dot_product_attention dropout layer_norm rms_norm embedding cat stack concat concatenate sum mean amax amin
prod cumsum any all argmax argmin topk sort index_select gather scatter scatter_add masked_select nonzero repeat
repeat_interleave tile flip roll triu tril clone arange ones zeros full empty eye rand randn randint randperm tensor
scalar_tensor ones_like zeros_like full_like empty_like rand_like randn_like randint_like new_ones new_zeros
new_full new_empty new_tensor outer
""".split())


def shares_storage_with(node: fx.Node) -> tuple[fx.Node, ...]:
    """The input nodes whose storage `node`'s value may share: what it writes into (an in-place op
    returns its target, an `out=` op its out tensor), nothing for a fresh op (or a `torch.ops` op whose
    schema returns no alias), every input otherwise (views, `reshape`, `contiguous`, a no-op `to`, and
    any op not known to be fresh)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return ()
    targets, schema = written(node), _schema(node)
    if targets or op_name(node) in FRESH or (schema is not None and all(r.alias_info is None for r in schema.returns)):
        return targets
    return tuple(node.all_input_nodes)


def alias_class(node: fx.Node) -> set[fx.Node]:
    """Every node whose value may share storage with `node`'s: its bases, their views, and so on."""
    seen, frontier = {node}, [node]
    while frontier:
        current = frontier.pop()
        linked = [*shares_storage_with(current), *(u for u in current.users if current in shares_storage_with(u))]
        for other in linked:
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return seen


def writers(nodes: set[fx.Node]) -> set[fx.Node]:
    """The nodes that write into any of `nodes`."""
    return {user for node in nodes for user in node.users if node in written(user)}
