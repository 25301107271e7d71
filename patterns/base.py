"""The vocabulary of a pattern: what to find (search functions), what it accepts (check),
what to put instead (replace), and the inputs to prove it on (examples).

Search functions are plain Python written like the code they match; the engine traces
them with torch.fx and brings them to the same canonical spelling as the model's graph.
Every parameter of a search function is a wildcard: it binds a value of the model's graph
(a tensor) or a literal (eps, a dim, a dtype), which `check` and `replace` read back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx


class Structural:
    """A piece of a search function that one traced node shape cannot express: it matches any
    of the node shapes `alternatives(node)` lists, each as (the node its input binds to, the
    values its other parameters bind to, the nodes of the model it covers). Run eagerly (on
    example inputs, in float64 references) it is the plain function it wraps."""

    def __init__(self, eager: Callable, alternatives: Callable):
        self.eager, self.alternatives = eager, alternatives
        self.__name__ = eager.__name__
        self.__doc__ = eager.__doc__

    def __call__(self, x, *params):
        if isinstance(x, fx.Proxy):
            return x.tracer.create_proxy("call_function", self, (x, *params), {})
        return self.eager(x, *params)

    def __repr__(self) -> str:
        return self.__name__


UNCHECKED = object()
"""An alternative of a structural piece gives this for a parameter it does not bind (the piece
is absent, so what the parameter stands for is not there to check)."""


def structural(alternatives: Callable) -> Callable[[Callable], Structural]:
    return lambda eager: Structural(eager, alternatives)


def is_cast(node: Any) -> bool:
    """The canonical cast of a graph: `x.to(dtype)` with nothing else."""
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to"
            and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype))


def _cast_shapes(node: Any):
    if is_cast(node):
        yield node.args[0], (node.args[1],), (node,)
    yield node, (None,), ()


@structural(_cast_shapes)
def cast(x, dtype):
    """An optional cast: matches `x.to(dtype)` (any spelling) or `x` itself, `dtype` then None."""
    return x if dtype is None else x.to(dtype)


@dataclass(frozen=True)
class Example:
    """One drawn input for a pattern: which search function, its arguments, and what to expect."""
    search: Callable
    kwargs: dict[str, Any]
    constants: tuple[str, ...] = ()  # tensor inputs that take no gradient (masks, say)

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, torch.Tensor):  # a small tensor's values too: what a shrunk failure is about
                values = f", values={v.flatten().tolist()}" if v.numel() <= 16 else ""
                return f"tensor({list(v.shape)}, {dtype_name(v.dtype)}, stride={list(v.stride())}{values})"
            return dtype_name(v) if isinstance(v, torch.dtype) else repr(v)
        args = ", ".join(f"{k}={show(v)}" for k, v in self.kwargs.items())
        return f"{self.search.__name__}({args})"


@dataclass(frozen=True)
class Pattern:
    """A family of code shapes and the fused op that replaces them.

    - searches: plain functions, most specific first (a node belongs to one match only);
    - check(match) -> None, or the reason this site is not rewritten (kernel limits);
    - replace(match) -> the fused op's value; `match[name]` gives each bound value;
    - describe(match) -> a short note of the kernel mode chosen, for reports;
    - examples: () -> a hypothesis strategy of `Example`s (shared by tests and `fuser.fuzz`);
    - anchors: canonical targets that mark a site (for near-miss notes).
    """
    name: str
    searches: tuple[Callable, ...]
    check: Callable[[Any], str | None]
    replace: Callable[[Any], Any]
    examples: Callable[[], Any]
    describe: Callable[[Any], str] = lambda match: ""
    anchors: tuple[Any, ...] = field(default_factory=tuple)


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "-"
