"""The vocabulary of a pattern: what to find (search rows: a function, its examples, how to read it),
what it accepts (check), what to put instead (replace).

Search functions are plain Python written like the code they match; the engine traces
them with torch.fx and brings them to the same canonical spelling as the model's graph.
Every parameter of a search function is a wildcard: it binds a value of the model's graph
(a tensor) or a literal (eps, a dim, a dtype), which `check` and `replace` read back.
"""
from __future__ import annotations

from dataclasses import dataclass
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
            if isinstance(v, torch.Tensor):  # never the values: the seed reproduces them
                return f"tensor({list(v.shape)}, {dtype_name(v.dtype)}, stride={list(v.stride())})"
            return dtype_name(v) if isinstance(v, torch.dtype) else repr(v)
        args = ", ".join(f"{k}={show(v)}" for k, v in self.kwargs.items())
        return f"{self.search.__name__}({args})"


@dataclass(frozen=True)
class Chain:
    """A search function that is one step of a loop Dynamo unrolled: `step(state, *inputs) -> (next state,
    output)`. The engine matches the steps along the threaded `state` (the first step's is the chain's initial
    state); each parameter in `sliced` reads position t of one base tensor along one dim at step t
    (consecutive positions); the others must bind the same thing in every step. The steps' outputs are
    written into one buffer at consecutive positions (`out[:, :, t] = o`) or stacked (`torch.stack(outs, d)`).
    The match binds `state` and each sliced name to the base tensor, and `chain` to a `ChainReading`.

    A chunkwise algorithm computes the tensors its steps slice from the real inputs first and reshapes the
    stacked outputs after: `prologue` is a search function returning the sliced bases (in `sliced` order),
    `epilogues` search functions taking the stacked outputs first (`out.reshape(...)[..., :T]`; the first that
    matches is taken: Dynamo drops a slice that keeps everything); they are then matched with
    the chain as one site, whose bindings are the prologue's and the epilogue's parameters, whose first result
    is the epilogue's value (`fuser/engine/chains.py: with_prologue`)."""
    state: str
    sliced: tuple[str, ...]
    prologue: Callable | None = None
    epilogues: tuple[Callable, ...] = ()


@dataclass(frozen=True)
class Search:
    """One spelling of a family, as a row of the pattern's table (Inductor's fuse_attention keeps rows of
    search, replacement, example inputs, extra check the same way):

    - function: plain Python written like the code it matches (traced once by the engine);
    - examples: () -> a hypothesis strategy of `Example`s whose code holds this spelling (shared by the
      tests and `fuser.fuzz`, so every spelling the engine rewrites is proved);
    - read: match -> the site in the family's own terms (scale, mask, weight placement ...), so that the
      pattern's check and replace see one description whichever spelling matched (`match.site`);
    - chain: set when the function is one step of a loop (`Chain`), matched along its state.
    """
    function: Callable
    examples: Callable[..., Any]
    read: Callable[[Any], Any] = lambda match: None
    chain: Chain | None = None  # the function is one step of a chain (see Chain)

    @property
    def __name__(self) -> str:
        return self.function.__name__


@dataclass(frozen=True)
class Pattern:
    """A family of code shapes and the fused op that replaces them.

    - searches: `Search` rows, most specific first (a node belongs to one match only);
    - check(match) -> None, or the reason this site is not rewritten (kernel limits);
    - replace(match) -> the fused op's value; `match[name]` gives each bound value, `match.site` the
      search's reading of it;
    - describe(match) -> a short note of the kernel mode chosen, for reports;
    - anchors: the canonical targets every site of the family holds (softmax, rsqrt, sort, topk): the
      engine tries the searches only where an anchor is, and an anchor left unrewritten is a near miss
      with the matcher's reason.
    """
    name: str
    searches: tuple[Search, ...]
    check: Callable[[Any], str | None]
    replace: Callable[[Any], Any]
    describe: Callable[[Any], str] = lambda match: ""
    anchors: tuple[Any, ...] = ()

    def __post_init__(self):
        if not self.anchors:
            raise ValueError(f"pattern {self.name!r} names no anchor: the engine would never try it")
        for search in self.searches:
            if not isinstance(search, Search) or not callable(search.examples):
                raise ValueError(f"pattern {self.name!r}: {getattr(search, '__name__', search)!r} is not a Search "
                                 "row with examples; every spelling the engine rewrites must be fuzzable")

    def examples(self) -> Any:
        """Examples of every spelling of the family, each search drawn as often as the others."""
        from hypothesis import strategies as st
        return st.one_of(*(search.examples() for search in self.searches))


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "-"
