"""The rewrite pass: canonicalize, match each pattern, check, replace each site by one fused op.

Never crash, never silently wrong: a site is rewritten only when the match is convex (no
value made inside it is used outside, nothing inside has side effects, no input is modified
while the match reads it), the pattern's check accepts it, its replacement builds, and, with
verification on, the replacement computes the same values as the original on real inputs.
Every site turned down becomes a near miss with its reason; `strict` raises instead.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx

from fuser.engine.canonical import where
from fuser.engine.matcher import Match, _Failure, find_all
from fuser.patterns.base import Pattern
from fuser.patterns.nodes import alias_class, mutates, value, writers, written
from fuser.report import MatchRecord, NearMiss, Report, Where
from fuser.numerics.contract import compare_site


class RewriteError(RuntimeError):
    """Raised in strict mode when a site that matched cannot be rewritten."""


def convexity_problem(m: Match) -> str | None:
    """Why the matched nodes cannot be replaced as one unit, or None."""
    inside = set(m.nodes)
    for node in m.nodes:
        if any(target not in inside for target in written(node)):
            return f"{node.name} inside the match modifies a tensor it did not create"
    for node in m.nodes[:-1]:
        outside = [u for u in node.users if u not in inside]
        if outside:
            return f"a value inside the match ({node.name}) is also used outside it (by {outside[0].name})"
    order = {n: i for i, n in enumerate(m.output.graph.nodes)}
    end = order[m.output]
    for name, node in m.inputs().items():  # a write through any alias, between its first reader and the end
        start = min((order[n] for n in m.nodes if node in n.all_input_nodes), default=end)
        for writer in sorted(writers(alias_class(node)) - inside, key=order.__getitem__):
            if start < order[writer] < end:
                return f"input {name} ({node.name}) is modified in place ({writer.name}) while the match reads it"
    return None


def _record_where(node: fx.Node) -> Where:
    return Where(*where(node))


def _propagate_meta(new_nodes: Iterable[fx.Node], like: fx.Node) -> None:
    """Give the nodes a replacement created the example values and source info the graph's others have."""
    for node in new_nodes:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        fakes = _fakes(args, kwargs)
        if not fakes:
            continue
        with fakes[0].fake_mode:
            if node.op == "call_function":
                node.meta["example_value"] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)


def _fakes(args: Any, kwargs: Any) -> list:
    found: list = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, torch._subclasses.FakeTensor) else a)
    return found


def apply(m: Match) -> list[fx.Node]:
    """Replace the match's nodes by what its pattern's replace builds; returns the new nodes (the output last)."""
    graph = m.output.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    m.resolve = lambda node: fx.Proxy(node, tracer)
    existing = set(graph.nodes)
    with graph.inserting_before(m.output):
        result = m.pattern.replace(m)
    m.resolve = None
    new_nodes = [n for n in graph.nodes if n not in existing]
    _propagate_meta(new_nodes, m.output)
    m.output.replace_all_uses_with(result.node)
    for node in reversed(m.nodes):
        graph.erase_node(node)
    return new_nodes


def rewrite(gm: fx.GraphModule, patterns: Iterable[Pattern], *, strict: bool = False,
            verify_values: dict | None = None, tag: str = "") -> Report:
    """Rewrite the canonicalized `gm` in place (see `prepare`). `verify_values` (node → real value,
    from `verify.capture_values`) turns on verification of each site. Strict mode raises where a
    site fails (an exception in a pattern, a verification mismatch) instead of keeping it.
    Returns what was rewritten and what was not, and why; `tag` prefixes the match ids."""
    graph = gm.graph
    report = Report()
    claimed: set[fx.Node] = set()
    erased: set[fx.Node] = set()
    position = {n: i for i, n in enumerate(graph.nodes)}
    inputs_of_rewrites: set[fx.Node] = set()
    for pattern in patterns:
        for search in pattern.searches:
            for node in reversed(list(graph.nodes)):  # outermost first: the largest match wins
                if node in erased or node in claimed or node.op in ("placeholder", "output", "get_attr"):
                    continue
                candidates = [m for m in find_all(pattern, search, node, _Failure())
                              if not claimed.intersection(m.nodes)]
                if not candidates:
                    continue
                accepted, problem = _first_acceptable(candidates, verify_values, strict)
                if accepted is None:  # report why the largest way of matching was turned down
                    _add_near_miss(report, NearMiss(pattern.name, _record_where(node), problem,
                                                    tuple(n.name for n in candidates[0].nodes)))
                    continue
                m = accepted
                names, site, mode = tuple(n.name for n in m.nodes), _record_where(m.output), pattern.describe(m)
                match_id = f"{tag}m{len(report.matches)}"
                inputs_of_rewrites.update(i for n in m.nodes for i in n.all_input_nodes)
                try:
                    new_nodes = apply(m)
                except Exception as error:  # a pattern bug must not break the user's model
                    if strict:
                        raise RewriteError(f"{pattern.name} at {site}: {type(error).__name__}: {error}") from error
                    _add_near_miss(report, NearMiss(pattern.name, site, f"the rewrite failed here ({type(error).__name__}: "
                                                    f"{error}); kept the original", names))
                    continue
                for new in new_nodes:
                    new.meta["fuser_match"] = match_id
                erased.update(m.nodes)
                claimed.update(new_nodes)
                fused = next((n for n in new_nodes if _op_name(n).startswith("fuser::")), new_nodes[-1])
                report.matches.append(MatchRecord(pattern.name, site, _op_name(fused), mode, names, fused.name, match_id))
    _erase_dead_inputs(graph, inputs_of_rewrites)
    graph.lint()
    gm.recompile()
    by_name = {n.name: i for n, i in position.items()}
    report.matches.sort(key=lambda m: by_name[m.nodes[-1]])
    report.near_misses.sort(key=lambda m: by_name[m.nodes[-1]])
    return report


def _first_acceptable(candidates: list[Match], verify_values: dict | None, strict: bool) -> tuple[Match | None, str]:
    """The first way of matching that is convex, that its pattern accepts and (verifying) that
    computes the original's values; else None and why the first was turned down."""
    first_problem = None
    for m in candidates:
        site = _record_where(m.output)
        try:
            problem = convexity_problem(m) or m.pattern.check(m)
            if problem is None and verify_values is not None:
                problem = compare_site(m, verify_values)
                if problem is not None and strict:
                    raise RewriteError(f"{m.pattern.name} at {site}: {problem}")
        except RewriteError:
            raise
        except Exception as error:  # a pattern bug must not break the user's model
            if strict:
                raise RewriteError(f"{m.pattern.name} at {site}: {type(error).__name__}: {error}") from error
            problem = f"the rewrite failed here ({type(error).__name__}: {error}); kept the original"
        if problem is None:
            return m, ""
        first_problem = first_problem or problem
    return None, first_problem


def _erase_dead_inputs(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase what only the replaced code used (a causal mask the kernel now computes itself), and
    what only that used, and so on; nothing that has side effects. No global dead-code removal:
    the torch-level graph is not functional, so only nodes our rewrites left unused are removed."""
    pending, erased = list(candidates), set()
    while pending:
        node = pending.pop()
        if node in erased or node._erased or node.users or node.op not in ("call_function", "call_method") \
                or mutates(node):
            continue
        pending.extend(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)


def _op_name(node: fx.Node) -> str:
    """`fuser::rms_norm` for the node of `torch.ops.fuser.rms_norm.default`."""
    target = node.target
    return getattr(target, "_qualified_op_name", None) or getattr(target, "name", lambda: str(target))()


def _add_near_miss(report: Report, miss: NearMiss) -> None:
    """One near miss per site: a smaller variant of an already reported site is not news."""
    nodes = set(miss.nodes)
    for seen in report.near_misses:
        if seen.pattern == miss.pattern and (nodes <= set(seen.nodes) or nodes >= set(seen.nodes)):
            return
    report.near_misses.append(miss)


def prepare(gm: fx.GraphModule) -> None:
    """Canonicalize before matching (separate so verification can read values of the canonical graph)."""
    from fuser.engine.canonical import canonicalize
    canonicalize(gm.graph)
