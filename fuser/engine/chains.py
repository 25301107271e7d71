"""Matching chains: a Python loop over positions, as Dynamo unrolls it, found by structure.

`for t in range(T): S, o = step(S, x[:, :, t], ...); out[:, :, t] = o` becomes T copies of the step's
nodes threading S. A `Search` row with a `Chain` names the step (a search function returning (next
state, output)); this module matches the step at every node an anchor reaches, links the steps whose
state is the previous step's next state, and reads each chain as one site:
- every sliced parameter is `base[:, ..., t]` (a getitem with full slices then an int, or `select`) of
  the same base along the same dim, at consecutive positions t0, t0 + 1, ...;
- every other parameter binds the same node or an equal literal in every step;
- the outputs are each written once by `setitem` into one fresh buffer (a factory: its every element is
  overwritten) at positions 0 … T − 1 along one dim, covering it, nothing reading the buffer before the last
  write (so its value afterwards is the steps' outputs stacked), or they are `torch.stack`ed as one list.
The match covers the steps, their slices, the buffer and its writes; its results are (the stacked outputs,
the last next state), read by the graph after the match (the rewriter's convexity check holds the rest).
A chunkwise chain (`Chain.prologue`, `Chain.epilogues`) is read with the code that makes what its steps slice
and the code that reads its buffer back, as one site (`with_prologue`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx

from fuser.engine.matcher import Match, _Failure, _same, search_graph
from fuser.patterns.base import Pattern, Search
from fuser.patterns.nodes import arguments, known_equal, tensor_meta

# fresh tensors whose every element a chain's writes replace (their fill never shows)
FACTORIES = {("call_function", f) for f in (torch.zeros, torch.zeros_like, torch.empty, torch.empty_like, torch.ones,
                                             torch.ones_like, torch.full, torch.full_like)} | \
            {("call_method", m) for m in ("new_zeros", "new_empty", "new_ones", "new_full")}


@dataclass(frozen=True)
class ChainReading:
    """What a chain site is, besides its bindings: each sliced parameter's time dim in its base, the first
    position and the number of steps, the dim the outputs are stacked along (in the stacked value), how they
    are collected ("setitem" into a buffer or "stack"), the first step's bindings and (next state, output)
    nodes (for shapes and dtypes), the stacked value's example."""
    dims: dict[str, int]
    start: int
    length: int
    out_dim: int
    form: str
    first: dict[str, Any]
    first_returns: tuple[fx.Node, fx.Node]
    stacked: torch.Tensor | None


@dataclass
class _Step:
    bindings: dict[str, Any]
    nodes: list[fx.Node]
    next_state: fx.Node
    output: fx.Node


def position(node: Any) -> tuple[fx.Node, int, int] | None:
    """(base, dim, index) for `base[:, ..., :, index]` (full slices, then an int ≥ 0, then nothing or full
    slices / `...`) and `base.select(dim, index)`; None for any other node."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    if node.op == "call_method" and node.target == "select" and len(node.args) == 3:
        base, dim, index = node.args
        rank = tensor_meta(base).dim() if tensor_meta(base) is not None else None
        if isinstance(dim, int) and isinstance(index, int) and index >= 0 and rank is not None and -rank <= dim < rank:
            return base, dim % rank, index
        return None
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    found = _index_position(node.args[1])
    return None if found is None else (node.args[0], *found)


def _index_position(index: Any) -> tuple[int, int] | None:
    """(dim, index) of a basic index that is full slices, an int ≥ 0, then nothing or full slices / `...`."""
    entries = index if isinstance(index, tuple) else (index,)
    full = [isinstance(e, slice) and e == slice(None) for e in entries]
    ints = [i for i, e in enumerate(entries) if type(e) is int]
    if len(ints) != 1 or entries[ints[0]] < 0 or not all(full[:ints[0]]):
        return None
    if not all(f or e is Ellipsis for f, e in zip(full[ints[0] + 1:], entries[ints[0] + 1:])):
        return None
    return ints[0], entries[ints[0]]


def _writes(output: fx.Node) -> tuple[fx.Node, fx.Node, int, int] | None:
    """(setitem node, buffer, dim, index) when `output`'s one use is `buffer[:, ..., index] = output`."""
    users = list(output.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target is not operator.setitem:
        return None
    write = users[0]
    if len(write.args) != 3 or write.kwargs or write.args[2] is not output:
        return None
    found = _index_position(write.args[1])
    return None if found is None else (write, write.args[0], *found)


def _steps(pattern: Pattern, search: Search, roots: list[fx.Node], claimed: set[fx.Node],
           attempts: list[_Failure]) -> list[_Step]:
    graph = search_graph(search.function, merge_duplicates=True)
    found = []
    for root in roots:
        if root in claimed or root.op != "call_function" and root.op != "call_method":
            continue
        failure = _Failure()
        attempts.append(failure)
        for bindings, nodes, (next_state, output) in graph.ways(root, failure):
            if not claimed.intersection(nodes):
                found.append(_Step(bindings, nodes, next_state, output))
                break
    return found


def find_chains(pattern: Pattern, search: Search, roots: list[fx.Node], claimed: set[fx.Node],
                attempts: list[_Failure]) -> Iterator[tuple[Match | None, str | None, list[fx.Node]]]:
    """(match, None, its nodes) for each chain of `search`'s steps read as a site, or (None, the reason it
    cannot be, the steps' nodes)."""
    chain = search.chain
    steps = _steps(pattern, search, roots, claimed, attempts)
    after = {}  # a step's next state -> the steps that take it as their state
    for step in steps:
        after.setdefault(step.bindings[chain.state], []).append(step)
    nexts = {id(s.next_state) for s in steps}
    for first in (s for s in steps if id(s.bindings[chain.state]) not in nexts):
        run, problem = [first], None
        while run[-1].next_state in after:
            following = after[run[-1].next_state]
            if len(following) > 1:
                problem = f"the state {run[-1].next_state.name} is the state of {len(following)} steps"
                break
            run.append(following[0])
        nodes = sorted({n for s in run for n in s.nodes}, key=_order(first.output).__getitem__)
        if problem is None:
            read = _read(pattern, search, run)
            if not isinstance(read, str) and chain.prologue is not None:
                read = with_prologue(read)
            if isinstance(read, str):
                problem = read
            else:
                yield read, None, read.nodes
                continue
        yield None, problem, nodes
    if chain.prologue is not None:
        attempts.extend(_unread_prologues(chain, roots, claimed, attempts))


def _unread_prologues(chain, roots: list[fx.Node], claimed: set[fx.Node], attempts: list[_Failure]
                      ) -> Iterator[_Failure]:
    """Attempts at the chunkwise prologue outside accepted chains, so that its anchors are a near miss saying
    why: a prologue no chain reads (its steps changed, with the closest step attempt's reason among those
    reading its tensors), or one matched in part (a tensor it makes is missing: Dynamo drops what nothing
    reads, such as the chunk decays of steps that do not decay the state)."""
    prologue = search_graph(chain.prologue)
    size = sum(n.op not in ("placeholder", "output") for n in prologue.graph.nodes)
    for root in roots:
        if root in claimed or root.op not in ("call_function", "call_method"):
            continue
        failure = _Failure()
        found = next(prologue.ways(root, failure), None)
        if found is None:
            failure.reason = f"{chain.prologue.__name__} matched {failure.depth} of its {size} nodes, then: " \
                             f"{failure.reason}"
        elif not claimed.intersection(found[1]):
            slices = {u for base in found[2] for piece in base.users for u in piece.users}  # what reads a slice
            closest = max((f for f in attempts if f.reached & slices), key=lambda f: f.depth, default=None)
            failure.depth, failure.reached, failure.at = len(found[1]), frozenset(found[1]), found[2][-1]
            failure.reason = (f"no chain of steps reads the tensors {chain.prologue.__name__} makes"
                              + (f" (closest step: {closest.reason})" if closest is not None else ""))
        else:
            continue
        yield failure


def _order(node: fx.Node) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(node.graph.nodes)}


def _read(pattern: Pattern, search: Search, run: list[_Step]) -> Match | str:
    """The chain `run` as one site, or the reason it is none."""
    chain, first = search.chain, run[0]
    bindings: dict[str, Any] = {chain.state: first.bindings[chain.state]}
    dims, covered, start = {}, {n for s in run for n in s.nodes}, None
    for name in chain.sliced:
        base = dim = None
        for t, step in enumerate(run):
            found = position(step.bindings[name])
            if found is None:
                return f"step {t} reads {name} as {_show(step.bindings[name])}, not as a position of a tensor"
            if t == 0:
                base, dim, start_here = found
                start = start_here if start is None else start
                if start_here != start:
                    return f"step 0 reads {name} at position {start_here} and {chain.sliced[0]} at {start}"
            elif found != (base, dim, start + t):
                return (f"step {t} reads {name} at {found[0].name}[dim {found[1]}: {found[2]}], not "
                        f"{base.name}[dim {dim}: {start + t}] (the steps read consecutive positions of one tensor)")
            covered.add(step.bindings[name])
        bindings[name], dims[name] = base, dim
    for name, bound in first.bindings.items():
        if name != chain.state and name not in chain.sliced:
            for t, step in enumerate(run[1:], 1):
                if not _same(step.bindings[name], bound):
                    return f"step {t} binds {name} to {_show(step.bindings[name])}, step 0 to {_show(bound)}"
            bindings[name] = bound
    collected = _collected([s.output for s in run])
    if isinstance(collected, str):
        return collected
    form, out_dim, result, more = collected
    covered |= more
    order = _order(first.output)
    nodes = sorted(covered, key=order.__getitem__)
    bindings["chain"] = ChainReading(dims, start, len(run), out_dim, form, first.bindings,
                                     (first.next_state, first.output), tensor_meta(result))
    return Match(pattern, search, bindings, nodes, results=(result, run[-1].next_state))


def _collected(outputs: list[fx.Node]) -> tuple[str, int, fx.Node, set[fx.Node]] | str:
    """(form, dim, the node holding the stacked outputs after the match, the nodes that collect them)."""
    users = list(outputs[0].users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is torch.stack:
        stack = users[0]
        args = arguments(stack, ["tensors", "dim"], {"dim": 0})
        if args is None or list(args["tensors"]) != outputs or not isinstance(args["dim"], int) or \
                any(list(o.users) != [stack] for o in outputs):
            return f"the steps' outputs are stacked by {stack.name} with other tensors or arguments"
        return "stack", args["dim"], stack, {stack}
    unsqueezed = _unsqueezed_for_cat(outputs)
    if unsqueezed is not None:
        return unsqueezed
    writes = [_writes(o) for o in outputs]
    if any(w is None for w in writes):
        t = next(i for i, w in enumerate(writes) if w is None)
        return (f"the output of step {t} ({outputs[t].name}) is used by {', '.join(u.name for u in outputs[t].users)}"
                f", not stacked nor written into one buffer at its position")
    buffer, dim = writes[0][1], writes[0][2]
    for t, (_, into, d, index) in enumerate(writes):
        if into is not buffer or d != dim or index != t:
            return f"step {t} writes its output into {into.name}[dim {d}: {index}], not {buffer.name}[dim {dim}: {t}]"
    if (buffer.op, buffer.target) not in FACTORIES:
        return f"the steps write into {buffer.name}, which is not a fresh tensor (zeros, empty, ... ) they overwrite"
    meta, each = tensor_meta(buffer), tensor_meta(outputs[0])
    if meta is None or each is None or meta.dim() != each.dim() + 1 or not known_equal(meta.shape[dim], len(outputs)) \
            or not all(known_equal(a, b) for a, b in zip(meta.shape[:dim] + meta.shape[dim + 1:], each.shape)):
        return f"the steps' outputs do not fill {buffer.name} (each write covers one position of it)"
    setitems = {w[0] for w in writes}
    order = _order(buffer)
    last = max(order[w] for w in setitems)
    early = [u for u in buffer.users if u not in setitems and order[u] < last]
    if early:
        return f"{early[0].name} reads {buffer.name} while the steps write into it"
    return "setitem", dim, buffer, setitems | {buffer}


def _unsqueezed_for_cat(outputs: list[fx.Node]) -> tuple[str, int, fx.Node, set[fx.Node]] | str | None:
    """`torch.cat([o.unsqueeze(d) for o in outputs], d)`: a stack; None when the outputs are not unsqueezed."""
    rank = tensor_meta(outputs[0]).dim() + 1 if tensor_meta(outputs[0]) is not None else None
    views = [next(iter(o.users)) if len(o.users) == 1 else None for o in outputs]
    if rank is None or not all(v is not None and v.op == "call_method" and v.target == "unsqueeze" and
                               len(v.args) == 2 and isinstance(v.args[1], int) and len(v.users) == 1 for v in views):
        return None
    cat = next(iter(views[0].users))
    args = arguments(cat, ["tensors", "dim"], {"dim": 0}) if cat.target is torch.cat else None
    dims = {v.args[1] % rank for v in views}
    if args is None or list(args["tensors"]) != views or not isinstance(args["dim"], int) or \
            dims != {args["dim"] % rank}:
        return f"the steps' outputs are unsqueezed and joined by {cat.name} with other tensors or along another dim"
    return "stack", args["dim"], cat, {cat, *views}


def _show(bound: Any) -> str:
    return bound.name if isinstance(bound, fx.Node) else repr(bound)


def with_prologue(m: Match) -> Match | str:
    """A chunkwise chain read with what makes the tensors its steps slice (`Chain.prologue`, matched with each
    returned value at the base the steps slice) and what reshapes the buffer its outputs are written into
    (`Chain.epilogues`, matched downstream of the buffer) as one site; or why it cannot be. A first state
    `initial.to(u)` (a cast like a tensor of the prologue: its dtype and device) is covered too, `state` then
    binding `initial` and `state_cast` True."""
    chain = m.search.chain
    bases = tuple(m.bindings[name] for name in chain.sliced)
    failure = _Failure()
    prologue = search_graph(chain.prologue)
    found = next(prologue.ways_at(bases, failure), None)
    if found is None:
        i = prologue.first_unmatched(bases)
        name, base = (chain.sliced[i], bases[i].name) if i < len(bases) else ("", "")
        return (f"the {name} the steps read ({base}) is not made as {chain.prologue.__name__} makes it (with "
                f"{', '.join(chain.sliced[:i]) or 'nothing'} before it; deepest mismatch: {failure.reason})")
    bindings, covered, _ = found
    nodes = set(m.nodes) | set(covered)
    state, cast = m.bindings[chain.state], False
    if isinstance(state, fx.Node) and state.op == "call_method" and state.target == "to" and not state.kwargs \
            and len(state.args) == 2 and isinstance(state.args[0], fx.Node) and state.args[1] in set(covered):
        nodes.add(state)
        state, cast = state.args[0], True
    buffer, final = m.results
    way = next(_epilogue(buffer, chain.epilogues), None)
    if way is None:
        return (f"the buffer {buffer.name} the chunk steps write is not read back as "
                f"{' or '.join(f.__name__ for f in chain.epilogues)} reads it")
    first, (after, more, returned) = way
    nodes |= set(more)
    order = _order(buffer)
    bindings = {**bindings, **{k: v for k, v in after.items() if k != first}, chain.state: state,
                "state_cast": cast, "chain": m.bindings["chain"]}
    return Match(m.pattern, m.search, bindings, sorted(nodes, key=order.__getitem__), results=(returned[-1], final))


def _epilogue(buffer: fx.Node, epilogues: tuple) -> Iterator[tuple[str, tuple]]:
    """(the epilogue's first parameter, its way of matching) for each epilogue matched below `buffer`, reading it."""
    for function in epilogues:
        epilogue = search_graph(function)
        first = epilogue.names[0]
        for candidate in _downstream(buffer, len(epilogue.graph.nodes)):
            for way in epilogue.ways(candidate):
                if way[0][first] is buffer:
                    yield first, way


def _downstream(node: fx.Node, hops: int) -> list[fx.Node]:
    """The nodes at most `hops` uses below `node`, nearest first."""
    found: dict[fx.Node, None] = {}
    frontier = [node]
    for _ in range(hops):
        frontier = list(dict.fromkeys(u for n in frontier for u in n.users if u not in found))
        found.update(dict.fromkeys(frontier))
    return list(found)
