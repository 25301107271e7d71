"""Canonicalization of torch-level FX graphs, and what the rest of the engine reads off nodes.

Dynamo records code as written: `x.softmax(-1)`, `F.softmax(x, dim=-1)` and
`torch.softmax(x, -1)` are three node forms of one function. Patterns are plain functions
traced the same way, so both graphs are brought to one spelling here before matching:
a pattern then covers every spelling of the code it reads like.

Canonical forms (all value-preserving):
- casts are `call_method to(x, dtype)`; `.float()`, `.half()`, `.bfloat16()`, `.double()`,
  `.type(dtype)`, `.type_as(y)`, `.to(dtype=...)` become that; a cast to the dtype x
  already has disappears;
- `torch.matmul` for `@`, `bmm`, `x.matmul`; `operator.mul/add/sub` for their torch and
  method spellings; `x / c` (c a number) is `x * (1 / c)`; `a / sqrt(b)` is `a * rsqrt(b)`;
- `torch.softmax(x, dim)`, with its `dtype=` argument turned into a cast before it;
- `F.scaled_dot_product_attention` with all eight arguments given (`scale`, `enable_gqa` by keyword); two-operand einsums
  that are batched matrix products as `torch.matmul`; a permute of the last two dims and `.mT` as a transpose;
  a full slice `x[:, :, :, :n]` (n the whole dim) and a view round trip `x.view(s).view(x.shape)` disappear;
- `torch.pow(x, n)` for `x.pow`, `x ** n`, `torch.square`, `x * x`; `torch.mean(x, dim, keepdim)`;
  `torch.rsqrt`; `torch.transpose(x, a, b)` with negative, ordered dims where the rank is known;
- `x.unsqueeze(d)` (a method) for `torch.unsqueeze` and for trailing new axes `x[..., None, :]` (d negative);
  `x.sum(d)` / `x.sum(d, True)` for one-dim sums in any spelling; `torch.exp`. (Their dims stay as written:
  search functions, traced without shapes, could not follow a positive dim made negative);
- keyword arguments equal to their default are dropped (`F.silu(x, inplace=False)`);
- identities vanish: dropout with p=0 or training=False. (`contiguous()` stays: a later `view`
  may need its layout.)
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from fuser.patterns.base import is_cast
from fuser.patterns.nodes import dropout_arguments, known_equal, tensor_meta, value

_FLOAT_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
                  "int": torch.int32, "long": torch.int64}

_SDPA_DEFAULTS = {"query": None, "key": None, "value": None, "attn_mask": None, "dropout_p": 0.0,
                  "is_causal": False, "scale": None, "enable_gqa": False}

# canonical target -> (spellings as (op, target), parameter names for argument normalization)
_SPELLINGS: dict[Any, tuple[list[tuple[str, Any]], list[str]]] = {
    torch.matmul: ([("call_function", operator.matmul), ("call_function", torch.matmul),
                    ("call_function", torch.bmm), ("call_method", "matmul"), ("call_method", "bmm")],
                   ["input", "other"]),
    operator.mul: ([("call_function", operator.mul), ("call_function", torch.mul), ("call_method", "mul")],
                   ["input", "other"]),
    operator.add: ([("call_function", operator.add), ("call_function", torch.add), ("call_method", "add")],
                   ["input", "other", "alpha"]),
    operator.sub: ([("call_function", operator.sub), ("call_function", torch.sub), ("call_method", "sub")],
                   ["input", "other", "alpha"]),
    operator.truediv: ([("call_function", operator.truediv), ("call_function", torch.div),
                        ("call_method", "div"), ("call_function", torch.true_divide)],
                       ["input", "other", "rounding_mode"]),
    torch.softmax: ([("call_function", torch.softmax), ("call_function", F.softmax), ("call_method", "softmax")],
                    ["input", "dim", "_stacklevel", "dtype"]),
    torch.pow: ([("call_function", torch.pow), ("call_method", "pow"), ("call_function", operator.pow)],
                ["input", "exponent"]),
    torch.mean: ([("call_function", torch.mean), ("call_method", "mean")], ["input", "dim", "keepdim", "dtype"]),
    torch.rsqrt: ([("call_function", torch.rsqrt), ("call_method", "rsqrt")], ["input"]),
    torch.sqrt: ([("call_function", torch.sqrt), ("call_method", "sqrt")], ["input"]),
    torch.transpose: ([("call_function", torch.transpose), ("call_method", "transpose")], ["input", "dim0", "dim1"]),
    torch.tanh: ([("call_function", torch.tanh), ("call_method", "tanh"), ("call_function", F.tanh)], ["input"]),
    torch.square: ([("call_function", torch.square), ("call_method", "square")], ["input"]),
    F.scaled_dot_product_attention: ([("call_function", F.scaled_dot_product_attention)], list(_SDPA_DEFAULTS)),
    torch.einsum: ([("call_function", torch.einsum)], ["equation", "a", "b"]),
    torch.permute: ([("call_function", torch.permute), ("call_method", "permute")], ["input", "dims"]),
    torch.exp: ([("call_function", torch.exp), ("call_method", "exp")], ["input"]),
}
_CANONICAL_OF = {spelling: canon for canon, (spellings, _) in _SPELLINGS.items() for spelling in spellings}
# F.softmax's _stacklevel and the like carry no meaning for the value
_DROPPED_DEFAULTS = {"_stacklevel", "alpha", "rounding_mode", "dtype"}


def dtype_of(node: Any) -> torch.dtype | None:
    t = tensor_meta(node)
    return t.dtype if t is not None else None


def rank_of(node: Any) -> int | None:
    t = tensor_meta(node)
    return t.dim() if t is not None else None


def where(node: fx.Node) -> tuple[str, str]:
    """(module path, 'file:line' of the user's code) for a node, as Dynamo recorded them."""
    stack = node.meta.get("nn_module_stack") or {}
    module = ""
    if stack:
        module = _clean_module_path(list(stack.values())[-1][0])
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    location = f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"
    return module, location


def _clean_module_path(path: str) -> str:
    """`L['self'].model.layers[0].mlp` (and its inlined-module spelling) → `model.layers.0.mlp`."""
    path = re.sub(r"^L\['[^']+'\](\[\d+\])?\.?", "", str(path))
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _normalized_args(node: fx.Node, params: list[str]) -> dict[str, Any] | None:
    """Positional and keyword arguments of a spelling, by parameter name; None if unknown kwargs."""
    bound = dict(zip(params, node.args))
    for key, arg in node.kwargs.items():
        if key not in params:
            return None
        bound[key] = arg
    return bound


def _replace(node: fx.Node, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.create_node(op, target, args, kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _cast(node: fx.Node, source: Any, dtype: torch.dtype) -> fx.Node:
    return _replace(node, "call_method", "to", (source, dtype))


def _drop_identity(node: fx.Node, source: fx.Node) -> None:
    node.replace_all_uses_with(source)
    node.graph.erase_node(node)


def _insert_cast_before(node: fx.Node, source: Any, dtype: torch.dtype) -> fx.Node:
    graph = node.graph
    with graph.inserting_before(node):
        cast = graph.call_method("to", (source, dtype))
    src = tensor_meta(source)
    if src is not None:
        cast.meta["example_value"] = src.to(dtype) if not _is_fake(src) else _fake_to(src, dtype)
    return cast


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor)


def _fake_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with t.fake_mode:
        return t.to(dtype)


def _canonical_cast(node: fx.Node) -> fx.Node | None:
    """Rewrite any dtype-only conversion to `to(x, dtype)`; None when the node is no such cast."""
    if node.op != "call_method" or not node.args:
        return None
    source, method = node.args[0], node.target
    if method in _FLOAT_METHODS and len(node.args) == 1 and not node.kwargs:
        return _cast(node, source, _FLOAT_METHODS[method])
    if method == "type_as" and len(node.args) == 2 and dtype_of(node.args[1]) is not None:
        return _cast(node, source, dtype_of(node.args[1]))
    if method in ("to", "type"):
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) == 2 else None)
        device = node.kwargs.get("device")
        src = tensor_meta(source)
        same_device = device is None or (src is not None and torch.device(device) == src.device)
        harmless = set(node.kwargs) <= {"dtype", "device", "non_blocking"} and not node.kwargs.get("copy")
        if isinstance(dtype, torch.dtype) and same_device and harmless:
            return node if is_cast(node) else _cast(node, source, dtype)
    return None


def _is_identity(node: fx.Node) -> fx.Node | None:
    """The input a value-preserving node passes on, or None."""
    dropout = dropout_arguments(node)
    if dropout is not None and not dropout["inplace"] and (dropout["p"] == 0 or dropout["training"] is False):
        return dropout["input"]
    if is_cast(node):
        src = dtype_of(node.args[0])
        if src is not None and src == node.args[1]:
            return node.args[0]
    return None


def _negative_dim(dim: Any, rank: int | None) -> Any:
    if isinstance(dim, int) and rank is not None and dim >= 0:
        return dim - rank
    return dim


def _known_same_sizes(a: Any, b: Any) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    if ta is None or tb is None or ta.dim() != tb.dim():
        return False
    return all(known_equal(x, y) for x, y in zip(ta.shape, tb.shape)) and \
        all(known_equal(x, y) for x, y in zip(ta.stride(), tb.stride()))


def _reshaped_back(node: fx.Node) -> fx.Node | None:
    """`x.view(s).view(x.shape)`: x itself, its elements in the same order and its storage (a view round trip
    older transformers attention code makes "to keep the gradient"); None for anything else (a reshape may
    copy, and a write into a copy is not a write into x)."""
    inner = node.args[0] if node.args else None
    if (node.op, node.target) != ("call_method", "view") or not isinstance(inner, fx.Node) or \
            (inner.op, inner.target) != ("call_method", "view") or len(inner.users) != 1:
        return None
    before, after = tensor_meta(inner.args[0]), tensor_meta(node)
    if before is None or after is None or before.dim() != after.dim() or \
            not all(known_equal(a, b) for a, b in zip(before.shape, after.shape)):
        return None
    return inner.args[0]


def _is_full_slice(node: fx.Node) -> bool:
    """`mask[:, :, :, :L]` where L covers the whole dim: the same tensor."""
    if node.op != "call_function" or node.target != operator.getitem or len(node.args) != 2:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(isinstance(i, slice) and i.step is None or i is Ellipsis for i in index) and \
        _known_same_sizes(node.args[0], node)


@functools.lru_cache(maxsize=None)
def _defaults(target: Any) -> dict[str, Any]:
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _drop_default_kwargs(node: fx.Node) -> None:
    """`F.silu(x, inplace=False)` is `F.silu(x)`."""
    defaults = _defaults(node.target)
    kept = {k: v for k, v in node.kwargs.items()
            if not (k in defaults and type(v) is type(defaults[k]) and v == defaults[k])}
    if len(kept) != len(node.kwargs):
        node.kwargs = kept


def _canonicalize_node(node: fx.Node) -> None:
    if node.op not in ("call_function", "call_method"):
        return
    if node.op == "call_function" and node.kwargs:
        _drop_default_kwargs(node)
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("mT",), ("mH",)) \
            and tensor_meta(node.args[0]) is not None and not tensor_meta(node.args[0]).is_complex():
        _replace(node, "call_function", torch.transpose, (node.args[0], -2, -1))
        return
    if _is_full_slice(node):
        _drop_identity(node, node.args[0])
        return
    source = _reshaped_back(node)
    if source is not None:
        inner = node.args[0]
        _drop_identity(node, source)
        node.graph.erase_node(inner)
        return
    if _canonical_view_or_sum(node):
        return
    cast = _canonical_cast(node)
    if cast is not None:
        node = cast
    source = _is_identity(node)
    if source is not None:
        _drop_identity(node, source)
        return
    canon = _CANONICAL_OF.get((node.op, node.target))
    if canon is None:
        return
    bound = _normalized_args(node, _SPELLINGS[canon][1])
    if canon is torch.pow and bound is not None and _is_number(bound.get("input")):  # `head_dim ** -0.5` on sizes
        return
    if canon is torch.permute and len(node.args) > 2:  # x.permute(0, 2, 1, 3)
        bound = {"input": node.args[0], "dims": tuple(node.args[1:])}
    if canon is torch.einsum and len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        bound = {"equation": node.args[0], **dict(zip(("a", "b"), node.args[1]))}
    if bound is None or bound.get("alpha", 1) != 1 or bound.get("rounding_mode") is not None:
        return
    args = [bound[p] for p in _SPELLINGS[canon][1] if p in bound and p not in _DROPPED_DEFAULTS]
    rewrite = _REWRITES.get(canon)
    if rewrite is not None:
        rewrite(node, args, bound)
    elif (node.op, node.target) != ("call_function", canon) or node.kwargs or tuple(args) != node.args:
        _replace(node, "call_function", canon, tuple(args))


def _trailing_new_axes(node: fx.Node) -> list[int] | None:
    """The dims `x[..., None, :, None]` inserts, as `unsqueeze` dims applied left to right; None for other indices."""
    if node.op != "call_function" or node.target != operator.getitem or len(node.args) != 2 or node.kwargs:
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or index[0] is not Ellipsis or None not in index[1:]:
        return None
    rest = index[1:]
    if not all(e is None or (isinstance(e, slice) and e == slice(None)) for e in rest):
        return None
    return [-(sum(e is not None for e in rest[i + 1:]) + 1) for i, e in enumerate(rest) if e is None]


def _unsqueezed(node: fx.Node, source: Any, dim: int) -> fx.Node:
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_method("unsqueeze", (source, dim))
    src = tensor_meta(source)
    if src is not None:
        new.meta["example_value"] = _on_meta(src, lambda t: t.unsqueeze(dim))
    return new


def _on_meta(t: torch.Tensor, f: Callable) -> torch.Tensor:
    if _is_fake(t):
        with t.fake_mode:
            return f(t)
    return f(t)


def _canonical_view_or_sum(node: fx.Node) -> bool:
    """`unsqueeze` and one-dim `sum` in their canonical spelling; True when `node` was one (and is rewritten)."""
    dims = _trailing_new_axes(node)
    if dims is not None:
        source = node.args[0]
        for dim in dims[:-1]:
            source = _unsqueezed(node, source, dim)
        _replace(node, "call_method", "unsqueeze", (source, dims[-1]))
        return True
    spelling = (node.op, node.target)
    if spelling in (("call_method", "unsqueeze"), ("call_function", torch.unsqueeze)):
        bound = _normalized_args(node, ["input", "dim"])
        if bound is None or not isinstance(bound.get("dim"), int):
            return False
        args = (bound["input"], bound["dim"])
        if spelling != ("call_method", "unsqueeze") or node.args != args or node.kwargs:
            _replace(node, "call_method", "unsqueeze", args)
        return True
    if spelling in (("call_method", "sum"), ("call_function", torch.sum)):
        bound = _normalized_args(node, ["input", "dim", "keepdim"])
        dim = bound.get("dim") if bound is not None else None
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        if not isinstance(dim, int) or not isinstance(bound.get("keepdim", False), bool):
            return False
        args = (bound["input"], dim) + ((True,) if bound.get("keepdim") else ())
        if spelling != ("call_method", "sum") or node.args != args or node.kwargs:
            _replace(node, "call_method", "sum", args)
        return True
    return False


def _rewrite_softmax(node: fx.Node, args: list, bound: dict) -> None:
    source, dim = args[0], _negative_dim(args[1] if len(args) > 1 else None, rank_of(args[0]))
    dtype = bound.get("dtype")
    if isinstance(dtype, torch.dtype) and dtype != dtype_of(source):
        source = _insert_cast_before(node, source, dtype)
    _replace(node, "call_function", torch.softmax, (source, dim))


def _rewrite_div(node: fx.Node, args: list, bound: dict) -> None:
    numerator, denominator = args
    if isinstance(denominator, (int, float)) and not isinstance(denominator, bool) and denominator != 0:
        _replace(node, "call_function", operator.mul, (numerator, 1.0 / denominator))
    elif isinstance(denominator, fx.Node) and denominator.op == "call_function" and denominator.target == torch.sqrt \
            and len(denominator.users) == 1:
        radicand = denominator.args[0]
        rsqrt = _replace(denominator, "call_function", torch.rsqrt, (radicand,))
        if numerator == 1 or numerator == 1.0:
            _drop_identity(node, rsqrt)
        else:
            _replace(node, "call_function", operator.mul, (numerator, rsqrt))
    else:
        _replace(node, "call_function", operator.truediv, tuple(args))


def _is_number(arg: Any) -> bool:
    """A number, or a node known to compute one (size arithmetic), which torch.pow does not take."""
    return isinstance(value(arg), (int, float, torch.SymInt, torch.SymFloat))


def _rewrite_mul(node: fx.Node, args: list, bound: dict) -> None:
    if len(args) == 2 and isinstance(args[0], fx.Node) and args[0] is args[1] and not _is_number(args[0]):
        _replace(node, "call_function", torch.pow, (args[0], 2))
    else:
        _replace(node, "call_function", operator.mul, tuple(args))


def _rewrite_mean(node: fx.Node, args: list, bound: dict) -> None:
    source = args[0]
    if isinstance(bound.get("dtype"), torch.dtype):
        source = _insert_cast_before(node, source, bound["dtype"])
    dim = bound.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    rank = rank_of(source)
    dim = tuple(_negative_dim(d, rank) for d in dim) if isinstance(dim, (list, tuple)) else _negative_dim(dim, rank)
    _replace(node, "call_function", torch.mean, (source, dim, bool(bound.get("keepdim", False))))


def _rewrite_transpose(node: fx.Node, args: list, bound: dict) -> None:
    rank = rank_of(args[0])
    d0, d1 = (_negative_dim(d, rank) for d in args[1:3])
    if isinstance(d0, int) and isinstance(d1, int):
        d0, d1 = min(d0, d1), max(d0, d1)
    _replace(node, "call_function", torch.transpose, (args[0], d0, d1))


def _rewrite_sdpa(node: fx.Node, args: list, bound: dict) -> None:
    """All eight arguments, defaults filled, the six positional ones positional: one form for every call."""
    values = [bound.get(name, default) for name, default in _SDPA_DEFAULTS.items()]
    args, kwargs = tuple(values[:6]), {"scale": values[6], "enable_gqa": values[7]}
    if args != node.args or kwargs != node.kwargs:
        _replace(node, "call_function", F.scaled_dot_product_attention, args, kwargs)


def _transposed(node: fx.Node, source: fx.Node) -> fx.Node:
    graph = node.graph
    with graph.inserting_before(node):
        transpose = graph.call_function(torch.transpose, (source, -2, -1))
    src = tensor_meta(source)
    if src is not None:
        transpose.meta["example_value"] = src.transpose(-2, -1)
    return transpose


def _rewrite_einsum(node: fx.Node, args: list, bound: dict) -> None:
    """Two-operand einsums that are batched matrix products: `bhqd,bhkd->bhqk` → q @ kᵀ."""
    equation, a, b = bound.get("equation"), bound.get("a"), bound.get("b")
    if not isinstance(equation, str) or "->" not in equation or not isinstance(b, fx.Node):
        return
    inputs, out = equation.replace(" ", "").split("->")
    if inputs.count(",") != 1 or "." in equation:
        return
    left, right = inputs.split(",")
    if not (len(left) == len(right) == len(out) >= 2 and left[:-2] == right[:-2] == out[:-2]):
        return
    (i, j), (k, l) = left[-2:], right[-2:]
    if out[-2:] == i + k and j == l and len({i, j, k}) == 3:
        _replace(node, "call_function", torch.matmul, (a, _transposed(node, b)))
    elif out[-2:] == i + l and j == k and len({i, j, l}) == 3:
        _replace(node, "call_function", torch.matmul, (a, b))


def _rewrite_permute(node: fx.Node, args: list, bound: dict) -> None:
    """A permutation that swaps only the last two dims is `transpose(-2, -1)`."""
    dims, rank = tuple(bound.get("dims") or ()), rank_of(bound["input"])
    if rank is not None and len(dims) == rank >= 2 and \
            tuple(_negative_dim(d, rank) for d in dims) == tuple(range(-rank, -2)) + (-1, -2):
        _replace(node, "call_function", torch.transpose, (bound["input"], -2, -1))


_REWRITES: dict[Any, Callable[[fx.Node, list, dict], None]] = {
    F.scaled_dot_product_attention: _rewrite_sdpa,
    torch.einsum: _rewrite_einsum,
    torch.permute: _rewrite_permute,
    torch.softmax: _rewrite_softmax,
    operator.truediv: _rewrite_div,
    operator.mul: _rewrite_mul,
    torch.mean: _rewrite_mean,
    torch.transpose: _rewrite_transpose,
    torch.square: lambda node, args, bound: _replace(node, "call_function", torch.pow, (args[0], 2)),
}


def canonicalize(graph: fx.Graph) -> None:
    """Bring every node of `graph` to its canonical spelling, in place (values unchanged)."""
    for node in list(graph.nodes):
        if node.graph is graph:  # an earlier rewrite may have erased it
            _canonicalize_node(node)
