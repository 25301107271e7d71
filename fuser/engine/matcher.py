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
    # the nodes whose values the replacement gives, in the order `replace` returns them, where that is not
    # the output alone (a chain: the buffer its steps write, and the final state); read after the match ends
    results: tuple[fx.Node, ...] | None = None

    @property
    def outputs(self) -> tuple[fx.Node, ...]:
        return self.results if self.results is not None else (self.output,)

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
        return a is b or _same_view(a, b)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _same_view(a: Any, b: Any) -> bool:
    """`k[t]` written twice: two getitem nodes of one tensor at one basic index (no tensor in it) read the same
    values (a write into the tensor between them is a write into a matched input, which the rewriter refuses)."""
    def basic(index: Any) -> bool:
        entries = index if isinstance(index, tuple) else (index,)
        return all(e is None or e is Ellipsis or type(e) is int or
                   isinstance(e, slice) and all(type(x) in (int, type(None)) for x in (e.start, e.stop, e.step))
                   for e in entries)
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and
            all(n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and not n.kwargs
                for n in (a, b)) and a.args[0] is b.args[0] and basic(a.args[1]) and a.args[1] == b.args[1])


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

    def __init__(self, search: Callable, merge_duplicates: bool = False):
        self.search, self.merge_duplicates = search, merge_duplicates
        self.graph = fx.symbolic_trace(search).graph
        canonicalize(self.graph)
        if merge_duplicates:
            _merge_duplicates(self.graph)
        (output,) = [n for n in self.graph.nodes if n.op == "output"]
        # a search returning a tuple (a chain's step: next state, output) is matched at its last value; the
        # others lie inside that match or beside it (downstream of what it matched, `_beside`)
        self.returns = tuple(output.args[0]) if isinstance(output.args[0], tuple) else (output.args[0],)
        self.output = self.returns[-1]
        self.names = [n.target for n in self.graph.nodes if n.op == "placeholder"]

    def matches(self, node: fx.Node, failure: _Failure | None = None) -> Iterator[tuple[dict, list[fx.Node]]]:
        """(bindings, covered nodes) for each way the search matches with `node` as its output,
        the ones that cover most first (structural pieces try their largest shape first)."""
        for bindings, covered, _ in self.ways(node, failure):
            yield bindings, covered

    def ways(self, node: fx.Node, failure: _Failure | None = None
             ) -> Iterator[tuple[dict, list[fx.Node], tuple[fx.Node, ...]]]:
        """`matches`, each with the model's nodes the search's returned values are (its output last)."""
        failure, order = failure or _Failure(), None
        for walked in self._node(self.output, node, _State({}, {}), failure):
            for state in self._beside(list(self.returns[:-1]), walked, failure):
                order = order or {n: i for i, n in enumerate(node.graph.nodes)}  # only once something matched
                yield self._found(state, tuple(state.mapped[r] for r in self.returns[:-1]) + (node,), order)

    def ways_at(self, nodes: tuple[fx.Node, ...], failure: _Failure | None = None
                ) -> Iterator[tuple[dict, list[fx.Node], tuple[fx.Node, ...]]]:
        """`ways` where each returned value must be the given node of the model (a chain's prologue: the
        tensors its steps slice)."""
        failure, order = failure or _Failure(), {n: i for i, n in enumerate(nodes[0].graph.nodes)}
        if len(nodes) == len(self.returns):
            for state in self._sequence(list(zip(self.returns, nodes)), _State({}, {}), failure):
                yield self._found(state, nodes, order)

    def first_unmatched(self, nodes: tuple[fx.Node, ...]) -> int:
        """The index of the first returned value that `ways_at` cannot match at its node along with those before."""
        for i in range(1, len(self.returns) + 1):
            pairs = list(zip(self.returns[:i], nodes[:i]))
            if next(self._sequence(pairs, _State({}, {}), _Failure()), None) is None:
                return i - 1
        return len(self.returns)

    def _found(self, state: _State, returned: tuple, order: dict) -> tuple[dict, list[fx.Node], tuple]:
        covered = set(state.mapped.values())
        covered |= _writes_into(covered, returned[-1], order)
        return ({name: state.bindings.get(name) for name in self.names}, sorted(covered, key=order.__getitem__),
                returned)

    def _beside(self, pending: list[fx.Node], state: _State, failure: _Failure) -> Iterator[_State]:
        """Each returned value the walk from the output did not reach, matched at a node of the model downstream
        of what is matched already (a chunk step's next state beside its output: both read `v_new`), no further
        than the search's own path from a matched node to it."""
        if not pending:
            yield state
            return
        p, rest = pending[0], pending[1:]
        if p in state.mapped:
            yield from self._beside(rest, state, failure)
            return
        hops = _hops_from(p, set(state.mapped))
        frontier = {t for q, t in state.mapped.items() if isinstance(q, fx.Node) and isinstance(t, fx.Node)}
        frontier |= {t for t in state.bindings.values() if isinstance(t, fx.Node)}
        seen: set[fx.Node] = set()
        for _ in range(hops):
            frontier = {u for t in frontier for u in t.users if u not in seen}
            seen |= frontier
        for candidate in sorted(seen, key=lambda n: n.name):
            for grown in self._node(p, candidate, state, failure):
                yield from self._beside(rest, grown, failure)
        if failure.depth <= len(state.mapped):  # no candidate got past its first node: say what is missing
            failure.depth = -1
            failure.note(state, f"nothing below what matched computes its returned value {self.returns.index(p)} "
                                f"({_op(p)}, within {hops} uses)")

    def _node(self, p: fx.Node, t: Any, state: _State, failure: _Failure) -> Iterator[_State]:
        if p.op == "placeholder":
            bound = state.bindings.get(p.target, _State)
            if bound is _State:
                yield state.bind(p.target, t)
            elif bound is t or not isinstance(t, fx.Node) and _same(bound, t):
                yield state
            elif _same(bound, t):  # the same view read twice: the second is covered too (it has no other use)
                yield state.map((p, "again", t), t)
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
            elif self.merge_duplicates and t not in state.mapped.values():
                copies = _copies(state.mapped[p], t)  # the same value computed twice (`k[..., None]` written twice)
                if copies is not None:
                    for copy in copies:
                        state = state.map((p, "again", copy), copy)
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
        elif isinstance(p, slice) and isinstance(t, slice):  # `x[:, :, :length]`
            yield from self._sequence([(p.start, t.start), (p.stop, t.stop), (p.step, t.step)], state, failure)
        elif _literal_equal(p, t):
            yield state
        else:
            failure.note(state, f"expected {p!r}, found {_describe(t)}", t)


def _hops_from(p: fx.Node, mapped: set) -> int:
    """The longest path in a search graph from a matched node or a placeholder to `p`."""
    longest: dict[fx.Node, int] = {}
    for node in p.graph.nodes:
        if node in mapped or node.op == "placeholder":
            longest[node] = 0
        elif any(i in longest for i in node.all_input_nodes):
            longest[node] = 1 + max(longest[i] for i in node.all_input_nodes if i in longest)
        if node is p:
            break
    return longest.get(p, 0)


def _copies(a: Any, b: Any) -> list[fx.Node] | None:
    """The nodes of `b` that recompute a node of `a` (`b` itself first), where `b` computes the value `a` does
    (the same node, the same view, the same pure op on such arguments); None where it may not."""
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if a is b:
            return []
        if _same_view(a, b):
            return [b]
        if a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target or \
                written(a) or written(b):
            return None
        inner = _copies((a.args, a.kwargs), (b.args, b.kwargs))
        return None if inner is None else [b, *inner]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if type(a) is not type(b) or len(a) != len(b):
            return None
        found = []
        for x, y in zip(a, b):
            inner = _copies(x, y)
            if inner is None:
                return None
            found += inner
        return found
    if isinstance(a, dict) and isinstance(b, dict):
        return _copies(list(a.items()), list(b.items())) if a.keys() == b.keys() else None
    return [] if not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and _same(a, b) else None


def _merge_duplicates(graph: fx.Graph) -> None:
    """One node per value in a search graph: a loop body may compute `k[..., None]` once or at each use, and the
    matcher then takes a model node computed twice as one (`_copies`)."""
    seen: dict = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        key = (node.op, node.target, repr((node.args, node.kwargs)))
        if key in seen and seen[key].args == node.args and seen[key].kwargs == node.kwargs:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen.setdefault(key, node)


@functools.lru_cache(maxsize=None)
def search_graph(search: Callable, merge_duplicates: bool = False) -> SearchGraph:
    """Each search function is traced once per process (chains' steps with duplicate values merged)."""
    return SearchGraph(search, merge_duplicates)


def find_all(pattern: Pattern, search: Search, node: fx.Node, failure: _Failure | None = None,
             limit: int = 16) -> Iterator[Match]:
    """The ways `search` matches at `node` (at most `limit`: optional pieces multiply them)."""
    for bindings, nodes in itertools.islice(search_graph(search.function).matches(node, failure), limit):
        yield Match(pattern, search, bindings, nodes)


def find(pattern: Pattern, search: Search, node: fx.Node, failure: _Failure | None = None) -> Match | None:
    return next(find_all(pattern, search, node, failure), None)
