"""Matching search functions against a canonical torch-level graph.

A search function is traced once with torch.fx and canonicalized; matching starts at its
output and walks the inputs, so a site is found by its last node. Placeholders of the
search bind anything (a node of the model's graph or a literal) and must bind the same
thing wherever they recur; commutative ops try both operand orders; structural pieces
(`cast(x, dtype)`: a cast or nothing) try each node shape they allow. Matching is a search with backtracking over those choices.
"""
from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch import fx

from fuser.engine.canonical import canonicalize, where
from fuser.patterns.base import UNCHECKED, Pattern, Search, Structural
from fuser.patterns.nodes import value, written

COMMUTATIVE = {operator.mul, operator.add}


@dataclass
class Match:
    """One site: the pattern, the search that matched, what its placeholders bound, the nodes it covers.

    While the site is replaced (or verified), `resolve` turns a node of the graph into the value
    the replacement computes with: an fx.Proxy when building the new graph, a real tensor when
    verifying; `match[name]` applies it to node bindings, literals come back as they are."""
    pattern: Pattern
    search: Search
    bindings: dict[str, Any]
    nodes: list[fx.Node]  # the model's nodes the match covers, in graph order; the last is its output
    resolve: Callable[[fx.Node], Any] | None = None

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @functools.cached_property
    def site(self) -> Any:
        """The search's reading of this match in its family's terms (`Search.read`)."""
        return self.search.read(self)

    def __getitem__(self, name: str) -> Any:
        bound = self.bindings[name]
        return self.resolve(bound) if self.resolve is not None and isinstance(bound, fx.Node) else bound

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.bindings else default

    def value_of(self, node: fx.Node) -> Any:
        """Any node that comes before the match (a mask's padding tensor, say), as `match[name]` gives."""
        return self.resolve(node) if self.resolve is not None else node

    def meta(self, name: str) -> Any:
        """The example value (a FakeTensor for a tensor) or the literal bound to `name`."""
        return value(self.bindings.get(name))

    def inputs(self) -> dict[str, fx.Node]:
        return {k: v for k, v in self.bindings.items() if isinstance(v, fx.Node)}

    def where(self) -> tuple[str, str]:
        return where(self.output)


@dataclass(frozen=True)
class _State:
    bindings: dict
    mapped: dict  # pattern node (or (structural piece, where, i)) -> model node

    def bind(self, name: str, target: Any) -> "_State":
        return _State({**self.bindings, name: target}, self.mapped)

    def map(self, p: Any, t: fx.Node) -> "_State":
        return _State(self.bindings, {**self.mapped, p: t})


class _Failure:
    """The deepest point a failed attempt reached: why it stopped there and the model's nodes it had
    matched by then (what a near miss reports)."""

    def __init__(self):
        self.depth, self.reason, self.reached = -1, "no node of this shape", frozenset()
        self.at: fx.Node | None = None  # the model's node where it stopped

    def note(self, state: "_State", reason: str, at: Any = None) -> None:
        if len(state.mapped) > self.depth:
            self.depth, self.reason = len(state.mapped), reason
            self.reached = frozenset(n for n in state.mapped.values() if isinstance(n, fx.Node))
            self.at = at if isinstance(at, fx.Node) else None


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target}({node.name})" if node.op != "placeholder" else node.name


def _op(p: fx.Node) -> str:
    """A search node as the user would read it: the function or method it calls."""
    return p.target if isinstance(p.target, str) else getattr(p.target, "__name__", str(p.target))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _literal_equal(pattern_literal: Any, target: Any) -> bool:
    if isinstance(target, fx.Node):
        return False
    if isinstance(pattern_literal, bool) or isinstance(target, bool):
        return pattern_literal is target
    try:
        return bool(pattern_literal == target)
    except Exception:
        return False


def _writes_into(covered: set[fx.Node], output: fx.Node, order: dict) -> set[fx.Node]:
    """In-place writes into tensors the match creates (`inv[perm] = arange(n)` after `inv = empty_like(perm)`)
    belong to the match: a search function can show them, but its walk from the output never meets them."""
    return {user for node in covered for user in node.users
            if user not in covered and node in written(user) and order[user] < order[output]}


class SearchGraph:
    """A search function traced and canonicalized, ready to match at any node."""

    def __init__(self, search: Callable):
        self.search = search
        self.graph = fx.symbolic_trace(search).graph
        canonicalize(self.graph)
        (output,) = [n for n in self.graph.nodes if n.op == "output"]
        self.output = output.args[0]

    def matches(self, node: fx.Node, failure: _Failure | None = None) -> Iterator[tuple[dict, list[fx.Node]]]:
        """(bindings, covered nodes) for each way the search matches with `node` as its output,
        the ones that cover most first (structural pieces try their largest shape first)."""
        failure = failure or _Failure()
        names = [n.target for n in self.graph.nodes if n.op == "placeholder"]
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        for state in self._node(self.output, node, _State({}, {}), failure):
            covered = set(state.mapped.values())
            covered |= _writes_into(covered, node, order)
            yield {name: state.bindings.get(name) for name in names}, sorted(covered, key=order.__getitem__)

    def _node(self, p: fx.Node, t: Any, state: _State, failure: _Failure) -> Iterator[_State]:
        if p.op == "placeholder":
            bound = state.bindings.get(p.target, _State)
            if bound is _State:
                yield state.bind(p.target, t)
            elif _same(bound, t):
                yield state
            else:
                failure.note(state, f"{p.target} bound to {_describe(bound)} and {_describe(t)}", t)
            return
        if isinstance(p.target, Structural):
            for inner, params, covered in p.target.alternatives(t):
                # the piece's own node may be covered again only by the same piece at the same place
                # (`xf` used twice in `xf * rsqrt(mean(xf²))`), never by another part of the search;
                # what it reads besides (a sentinel mask shared by two GEMMs) may be shared
                if t in covered and t in state.mapped.values() and \
                        state.mapped.get((p, t, covered.index(t))) is not t:
                    continue
                grown = state
                for i, node in enumerate(covered):
                    grown = grown.map((p, t, i), node)
                pairs = [(p.args[0], inner)] + [(q, v) for q, v in zip(p.args[1:], params) if v is not UNCHECKED]
                yield from self._sequence(pairs, grown, failure)
            return
        if p in state.mapped:
            if state.mapped[p] is t:
                yield state
            return
        if not isinstance(t, fx.Node) or t.op != p.op or t.target != p.target:
            failure.note(state, f"expected {_op(p)}, found {_describe(t)}", t)
            return
        if t in state.mapped.values() or len(t.args) != len(p.args) or set(t.kwargs) != set(p.kwargs):
            failure.note(state, f"{_describe(t)} has other arguments than the {_op(p)} of the search", t)
            return
        state = state.map(p, t)
        orders = [p.args]
        if p.target in COMMUTATIVE and len(p.args) == 2:
            orders.append(p.args[::-1])
        for p_args in orders:
            pairs = list(zip(p_args, t.args)) + [(p.kwargs[k], t.kwargs[k]) for k in p.kwargs]
            yield from self._sequence(pairs, state, failure)

    def _sequence(self, pairs: list, state: _State, failure: _Failure) -> Iterator[_State]:
        if not pairs:
            yield state
            return
        (p, t), rest = pairs[0], pairs[1:]
        for after_first in self._arg(p, t, state, failure):
            yield from self._sequence(rest, after_first, failure)

    def _arg(self, p: Any, t: Any, state: _State, failure: _Failure) -> Iterator[_State]:
        if isinstance(p, fx.Node):
            yield from self._node(p, t, state, failure)
        elif isinstance(p, (list, tuple)):
            if isinstance(t, (list, tuple)) and len(t) == len(p):
                yield from self._sequence(list(zip(p, t)), state, failure)
            else:
                failure.note(state, f"expected {p!r}, found {_describe(t)}", t)
        elif _literal_equal(p, t):
            yield state
        else:
            failure.note(state, f"expected {p!r}, found {_describe(t)}", t)


@functools.lru_cache(maxsize=None)
def search_graph(search: Callable) -> SearchGraph:
    """Each search function is traced once per process."""
    return SearchGraph(search)


def find_all(pattern: Pattern, search: Search, node: fx.Node, failure: _Failure | None = None,
             limit: int = 16) -> Iterator[Match]:
    """The ways `search` matches at `node` (at most `limit`: optional pieces multiply them)."""
    for bindings, nodes in itertools.islice(search_graph(search.function).matches(node, failure), limit):
        yield Match(pattern, search, bindings, nodes)


def find(pattern: Pattern, search: Search, node: fx.Node, failure: _Failure | None = None) -> Match | None:
    return next(find_all(pattern, search, node, failure), None)
