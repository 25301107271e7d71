"""The rewrite pass, in two phases every door shares: `plan` decides, `apply` changes the graph.

`plan(gm, patterns)` matches each pattern on a canonical graph and decides each site without changing
anything: the accepted matches and the near misses with their reasons. `apply(plan)` replaces each
accepted match by its fused op and returns the report. `rewrite(gm, ...)` is what the doors call: it
canonicalizes a copy (the original stays as Dynamo gave it, for Inductor, where nothing is rewritten),
plans, verifies on real inputs, applies.

Never crash, never silently wrong: a site is rewritten only when the match is convex (no value made
inside it is used outside, nothing inside has side effects, no input is modified while the match reads
it), the pattern's check accepts it, its replacement builds, and, with verification on, the replacement
computes the same values as the original on real inputs. Every site turned down becomes a near miss
with its reason; `strict` raises instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from dataclasses import dataclass, field
import logging
from typing import Any, Iterable

import torch
from torch import fx

from fuser.engine.canonical import canonicalize, where
from fuser.engine.capture import stash_values
from fuser.engine.chains import find_chains
from fuser.engine.matcher import Match, _Failure, find_all, search_graph
from fuser.numerics.contract import compare_site
from fuser.patterns.base import Pattern
from fuser.patterns.nodes import alias_class, mutates, value, writers, written
from fuser.report import MatchRecord, NearMiss, Report, Where
from fuser.report.graphs import graph_to_networkx


log = logging.getLogger(__name__)  # TORCH_LOGS="fuser": each rewrite and near miss as it is decided


class RewriteError(RuntimeError):
    """Raised in strict mode when a site that matched cannot be rewritten."""


@dataclass
class Plan:
    """What the engine decided for one canonical graph; the graph itself is unchanged until `apply`."""
    gm: fx.GraphModule
    matches: list[Match] = field(default_factory=list)      # accepted, in the order found (patterns in order)
    near_misses: list[NearMiss] = field(default_factory=list)


def convexity_problem(m: Match) -> str | None:
    """Why the matched nodes cannot be replaced as one unit, or None."""
    inside = set(m.nodes)
    order = {n: i for i, n in enumerate(m.output.graph.nodes)}
    end = order[m.output]
    for node in m.nodes:
        if any(target not in inside for target in written(node)):
            return f"{node.name} inside the match modifies a tensor it did not create"
    for node in m.nodes[:-1]:
        # a result (a chain's final state) may be read after the match, where the replacement gives it
        outside = [u for u in node.users if u not in inside and (node not in m.outputs or order[u] < end)]
        if outside:
            return f"a value inside the match ({node.name}) is also used outside it (by {outside[0].name})"
    for name, node in m.inputs().items():  # a write through any alias, between its first reader and the end
        start = min((order[n] for n in m.nodes if node in n.all_input_nodes), default=end)
        for writer in sorted(writers(alias_class(node)) - inside, key=order.__getitem__):
            if start < order[writer] < end:
                return f"input {name} ({node.name}) is modified in place ({writer.name}) while the match reads it"
    return None


def _roots(anchors: list[fx.Node], hops: int) -> set[fx.Node]:
    """The nodes a match holding one of `anchors` can end at: the anchors and their users up to `hops` away
    (a search graph of n nodes reaches at most n − 1 nodes past any of its own)."""
    found, frontier = set(anchors), list(anchors)
    for _ in range(hops):
        frontier = [user for node in frontier for user in node.users if user not in found]
        found.update(frontier)
    return found


@functools.lru_cache(maxsize=None)
def _reach(pattern: Pattern, search) -> int:
    """How many nodes past an anchor a match of `search` can end: the longest path in its graph from an anchor
    to its output, each step a structural piece that may cover up to 3 of the model's nodes (`repeat_kv`). A
    search that holds none of its pattern's anchors could never be tried: an error in the pattern library."""
    starts: dict[str, int] = {}
    if search.chain is not None and search.chain.prologue is not None:  # the steps slice what the prologue makes
        prologue = search_graph(search.chain.prologue)
        reached = _longest(prologue.graph, pattern.anchors, {})
        starts = {name: reached[r] + 1 for name, r in zip(search.chain.sliced, prologue.returns) if r in reached}
    longest = _longest(search_graph(search.function).graph, pattern.anchors, starts)
    output = next(n for n in search_graph(search.function).graph.nodes if n.op == "output")
    if output not in longest:
        raise ValueError(f"pattern {pattern.name!r}: search {search.__name__} holds none of its anchors "
                         f"{', '.join(getattr(a, '__name__', str(a)) for a in pattern.anchors)}")
    return 3 * longest[output]


def _longest(graph: fx.Graph, anchors: tuple, starts: dict[str, int]) -> dict[fx.Node, int]:
    """The longest path to each node from an anchor (or from a placeholder named in `starts`, that far)."""
    longest: dict[fx.Node, int] = {}
    for node in graph.nodes:  # topological order: a node's inputs come first
        from_inputs = [longest[i] + 1 for i in node.all_input_nodes if i in longest]
        if node.target in anchors:
            from_inputs.append(0)
        if node.op == "placeholder" and node.target in starts:
            from_inputs.append(starts[node.target])
        if from_inputs:
            longest[node] = max(from_inputs)
    return longest


def _problem(m: Match, strict: bool) -> str | None:
    """Why `m` cannot be rewritten (convexity, the pattern's check), or None; a pattern's exception is a
    problem too (a pattern bug must not break the user's model), raised in strict mode."""
    try:
        return convexity_problem(m) or m.pattern.check(m) or _dtensor_problem(m)
    except Exception as error:
        if strict:
            raise RewriteError(f"{m.pattern.name} at {Where(*m.where())}: {type(error).__name__}: {error}") from error
        return f"the rewrite failed here ({type(error).__name__}: {error}); kept the original"


def _dtensor_problem(m: Match) -> str | None:
    """Where a match reads DTensors (tensor parallelism), its replacement is run once on their example values
    (fake, no data): a fused op without a sharding rule for them (`kernels.runtime.sharding`) leaves the
    original code, rather than failing at compile time."""
    inside = set(m.nodes)
    read = [value(a) for n in m.nodes for a in n.all_input_nodes if a not in inside]
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    dtensors = [v for v in read if isinstance(v, DTensor)]
    if not dtensors:
        return None
    m.resolve = value
    try:
        with contextlib.ExitStack() as stack:
            fake_mode = getattr(dtensors[0]._local_tensor, "fake_mode", None)
            if fake_mode is not None:
                stack.enter_context(fake_mode)
            m.pattern.replace(m)
    except Exception as error:
        return f"reads DTensors, which the fused op cannot take ({type(error).__name__}: {error}); kept the original"
    finally:
        m.resolve = None
    return None


def plan(gm: fx.GraphModule, patterns: Iterable[Pattern], *, strict: bool = False) -> Plan:
    """Decide every site of the canonical `gm` (see `canonicalize`): for each pattern in order, its searches
    are tried at the nodes an anchor of the pattern can reach (outermost first: the largest match wins);
    the first way of matching that is convex and accepted is taken. An anchor no accepted match covers is
    a near miss with the reason of the attempt that came closest to it. Nothing is changed."""
    graph, result = gm.graph, Plan(gm)
    claimed: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    for pattern in patterns:
        anchors = [n for n in graph.nodes if n.target in pattern.anchors and n.op != "get_attr"]
        if not anchors:
            continue
        attempts: list[_Failure] = []
        for search in pattern.searches:
            roots = _roots(anchors, _reach(pattern, search))
            if search.chain is not None:
                _plan_chains(pattern, search, sorted(roots, key=order.__getitem__), claimed, attempts, result, strict)
                continue
            for node in sorted(roots, key=order.__getitem__, reverse=True):
                if node in claimed or node.op in ("placeholder", "output", "get_attr"):
                    continue
                failure = _Failure()
                attempts.append(failure)
                candidates = [m for m in find_all(pattern, search, node, failure) if not claimed.intersection(m.nodes)]
                if not candidates:
                    continue
                problems = [(m, _problem(m, strict)) for m in candidates]
                accepted = next((m for m, problem in problems if problem is None), None)
                if accepted is None:  # why the largest way of matching was turned down
                    _add_near_miss(result.near_misses, NearMiss(pattern.name, Where(*where(node)), problems[0][1],
                                                                tuple(n.name for n in candidates[0].nodes)))
                    continue
                result.matches.append(accepted)
                claimed.update(accepted.nodes)
        reported = {name for miss in result.near_misses if miss.pattern == pattern.name for name in miss.nodes}
        for anchor in anchors:
            if anchor in claimed or anchor.name in reported:
                continue
            closest = max((f for f in attempts if anchor in f.reached), key=lambda f: f.depth, default=None)
            if closest is not None:
                reached = tuple(n.name for n in sorted(closest.reached, key=order.__getitem__))
                result.near_misses.append(NearMiss(pattern.name, Where(*where(anchor)),
                                                   f"not {pattern.name}: {closest.reason}", reached,
                                                   closest.at.name if closest.at is not None else ""))
                reported.update(reached)
    result.matches.sort(key=lambda m: order[m.output])
    return result


def _plan_chains(pattern: Pattern, search, roots: list[fx.Node], claimed: set[fx.Node], attempts: list[_Failure],
                 result: Plan, strict: bool) -> None:
    """`plan` for a search that is one step of a chain (`patterns.base.Chain`): each chain its steps make is
    one site, taken when it is convex and accepted, else a near miss."""
    for m, problem, nodes in find_chains(pattern, search, roots, claimed, attempts):
        problem = problem or _problem(m, strict)
        if problem is None:
            result.matches.append(m)
            claimed.update(m.nodes)
        else:
            _add_near_miss(result.near_misses, NearMiss(pattern.name, Where(*where(nodes[-1])), problem,
                                                        tuple(n.name for n in nodes)))


def _positions(graph: fx.Graph) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(graph.nodes)}


def verify_plan(result: Plan, values: dict[fx.Node, Any], *, strict: bool = False) -> None:
    """Check each accepted match against its original on recorded real values (`stash_values`); a match
    whose replacement computes other values leaves the plan as a near miss (strict: raises)."""
    kept = []
    for m in result.matches:
        try:
            problem = compare_site(m, values)
        except Exception as error:
            problem = f"could not be verified ({type(error).__name__}: {error}); kept the original"
        if problem is None:
            kept.append(m)
            continue
        if strict:
            raise RewriteError(f"{m.pattern.name} at {Where(*m.where())}: {problem}")
        result.near_misses.append(NearMiss(m.pattern.name, Where(*m.where()), problem, tuple(n.name for n in m.nodes)))
    result.matches = kept


def apply(result: Plan, *, strict: bool = False, pictures: bool = False) -> Report:
    """Replace every accepted match of `result` in its graph; the report of what was and was not rewritten
    (with the graph before and after as networkx graphs when `pictures`)."""
    gm, graph, tag = result.gm, result.gm.graph, f"g{next(_graph_ids)}."
    report = Report(near_misses=[dataclasses.replace(miss, graph=tag[:-1]) for miss in result.near_misses])
    before = graph_to_networkx(graph, tag) if pictures else None
    position = _positions(graph)
    replaced: dict[fx.Node, fx.Node] = {}  # an applied match's output -> its fused op's node
    inputs_of_rewrites: set[fx.Node] = set()
    for m in result.matches:
        names, site, mode = tuple(n.name for n in m.nodes), Where(*m.where()), m.pattern.describe(m)
        match_id = f"{tag}m{len(report.matches)}"
        inputs = {replaced.get(i, i) for n in m.nodes for i in n.all_input_nodes}  # before erasing clears them
        bound = tuple((name, node.name) for name, node in m.inputs().items())
        try:
            new_nodes, results = _replace(m, replaced)
        except Exception as error:  # a pattern bug must not break the user's model
            if strict:
                raise RewriteError(f"{m.pattern.name} at {site}: {type(error).__name__}: {error}") from error
            report.near_misses.append(NearMiss(m.pattern.name, site, f"the rewrite failed here ({type(error).__name__}:"
                                               f" {error}); kept the original", names, graph=tag[:-1]))
            continue
        inputs_of_rewrites |= inputs
        replaced.update(results)
        for new in new_nodes:
            new.meta["fuser_match"] = match_id
        fused = next((n for n in new_nodes if _op_name(n).startswith("fuser::")), new_nodes[-1])
        report.matches.append(MatchRecord(m.pattern.name, site, _op_name(fused), mode, names, fused.name, match_id,
                                          bound))
        log.info("%s: rewrote %s at %s into %s (%s)", match_id, m.pattern.name, site, _op_name(fused), mode)
        if before is not None:
            for name in names:
                before.nodes[tag + name]["match"] = match_id
    if report.matches:
        _erase_dead_inputs(graph, inputs_of_rewrites - set(replaced))
        graph.lint()
        gm.recompile()
    report.matches.sort(key=lambda r: position[r.nodes[-1]])
    report.near_misses.sort(key=lambda r: position.get(r.nodes[-1], -1) if r.nodes else -1)
    for miss in report.near_misses:
        log.info("near miss: %s at %s left as it was: %s", miss.pattern, miss.where, miss.reason)
    if pictures:
        report.graphs.append((before, graph_to_networkx(graph, tag) if report.matches else before))
    return report


def _replace(m: Match, replaced: dict[fx.Node, fx.Node]) -> tuple[list[fx.Node], dict[fx.Node, fx.Node]]:
    """Put what the match's pattern builds in place of its nodes; the new nodes (the output last) and the
    new node of each of the match's results. A node an earlier match replaced is read as the fused op that
    took its place; a result read after the match (a chain's final state) is read from the replacement."""
    graph = m.output.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    existing = set(graph.nodes)
    m.resolve = lambda node: fx.Proxy(replaced.get(node, node), tracer)
    try:
        with graph.inserting_before(m.output):
            result = m.pattern.replace(m)
    finally:
        m.resolve = None
    new_nodes = [n for n in graph.nodes if n not in existing]
    try:
        _propagate_meta(new_nodes, m.output)
    except Exception:
        for node in reversed(new_nodes):
            graph.erase_node(node)
        raise
    values = result if m.results is not None else (result,)
    inside = set(m.nodes)
    for node, new in zip(m.outputs, values):
        node.replace_all_uses_with(new.node, delete_user_cb=lambda user: user not in inside)
    for node in reversed(m.nodes):
        graph.erase_node(node)
    return new_nodes, {node: new.node for node, new in zip(m.outputs, values)}


def _propagate_meta(new_nodes: Iterable[fx.Node], like: fx.Node) -> None:
    """Give the nodes a replacement created the example values and source info the graph's others have."""
    for node in new_nodes:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        fakes = _fakes(args, kwargs)
        if not fakes:  # size or scalar arithmetic (a symbolic scale times a number): computed as it is
            if node.op == "call_function" and _symbolic(args, kwargs):
                node.meta["example_value"] = node.target(*args, **kwargs)
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


def _symbolic(args: Any, kwargs: Any) -> bool:
    found: list = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(
        a, (torch.SymInt, torch.SymFloat, torch.SymBool)) else a)
    return bool(found)


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


def _add_near_miss(near_misses: list[NearMiss], miss: NearMiss) -> None:
    """One near miss per site: a smaller variant of an already reported site is not news."""
    nodes = set(miss.nodes)
    for seen in near_misses:
        if seen.pattern == miss.pattern and (nodes <= set(seen.nodes) or nodes >= set(seen.nodes)):
            return
    near_misses.append(miss)


_graph_ids = itertools.count()


# What Dynamo hangs on its graph module and placeholders beside the graph, which AOTAutograd reads back: without
# them it takes the graph for one Dynamo did not capture and marks no input static, so CUDA-graph trees
# (mode="reduce-overhead") copy every parameter into the graph's buffers at each replay (seen on the H200: an
# OLMoE block's 800 MB of experts copied per call, 0.88 ms against 0.41 for plain torch.compile).
_DYNAMO_MODULE_ATTRIBUTES = ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason",
                             "_backend_id")


def canonical_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A canonical copy of `gm`'s graph over the same modules and parameters (nothing is copied but nodes),
    carrying Dynamo's metadata: matching reads one spelling, and the original stays as Dynamo made it."""
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    copied = fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    for name in _DYNAMO_MODULE_ATTRIBUTES:
        if hasattr(gm, name):
            setattr(copied, name, getattr(gm, name))
    for node in gm.graph.find_nodes(op="placeholder"):
        if hasattr(node, "_dynamo_source"):
            copies[node]._dynamo_source = node._dynamo_source
    canonicalize(copied.graph)
    return copied


def decide(gm: fx.GraphModule, patterns: Iterable[Pattern], example_inputs: list | None = None, *,
           verify: bool = False, strict: bool = False) -> Plan:
    """`plan` on the canonical `gm`, then (`verify`) each accepted site checked on `example_inputs`."""
    decided = plan(gm, patterns, strict=strict)
    if decided.matches and verify and example_inputs is not None:
        verify_plan(decided, stash_values(gm, example_inputs, decided.matches), strict=strict)
    return decided


def rewrite(gm: fx.GraphModule, patterns: Iterable[Pattern], example_inputs: list | None = None, *,
            verify: bool = False, strict: bool = False, pictures: bool = False) -> tuple[fx.GraphModule, Report]:
    """The graph module to run in place of `gm`, and the report: a canonical copy with the accepted sites
    rewritten, or `gm` itself where nothing is (so Inductor sees what plain torch.compile gives it).
    `verify` checks each site against its original on `example_inputs` (real values) first; `pictures`
    keeps the graphs before and after for the report."""
    copied = canonical_copy(gm)
    report = apply(decide(copied, patterns, example_inputs, verify=verify, strict=strict), strict=strict,
                   pictures=pictures)
    return (copied if report.matches else gm), report
