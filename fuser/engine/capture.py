"""Capturing the torch-level graphs Dynamo makes of a call, without compiling anything.

Dynamo keeps state per code it starts from: its compiled versions (after `recompile_limit`,
8, it stops compiling that code and runs it as is) and what it learned about the inputs (a
float attribute seen with two values, an RMSNorm's eps in two models, becomes a dynamic input
the next time). Capturing the same module class many times (every norm of a model, a test
suite explaining one architecture again and again) would reach that limit, or turn eps into
a variable no pattern accepts. So each capture starts from a fresh copy of a one-line
caller, under a name of its own: its state is its own and goes away with it, and the
model's code is left untouched.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import re
import types
from typing import Any, Callable, Iterator

import torch
from torch import fx

from fuser.patterns.nodes import alias_class, written
from fuser.report import GraphBreak, Where


def _call(target, args, kwargs):
    return target(*args, **kwargs)


_captures = itertools.count()


def capture(target: Callable, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool | None = False,
            fullgraph: bool = False, grad: bool = False) -> list[tuple[fx.GraphModule, list]]:
    """(graph module, example inputs) of each graph Dynamo captures for `target(*args, **kwargs)`, run once
    with gradients recorded or not (`grad`: what a site must support, e.g. a learned bias's gradient, depends
    on it); the graphs are copies, free to rewrite."""
    captured = []

    def backend(gm: fx.GraphModule, example_inputs: list, **_: Any):
        captured.append((copy.deepcopy(gm), list(example_inputs)))
        return gm.forward

    name = f"_capture_{next(_captures)}"
    caller = types.FunctionType(_call.__code__.replace(co_name=name, co_qualname=name), _call.__globals__, name)
    with torch.set_grad_enabled(grad):
        torch.compile(caller, backend=backend, dynamic=dynamic, fullgraph=fullgraph)(target, args, kwargs or {})
    return captured


# Dynamo logs each graph break on this artifact logger ("Graph break in user code at FILE:LINE" is a line
# its tests hold it to, torch 2.11 and 2.13), when the logger is enabled at DEBUG
_GRAPH_BREAK_LOGGER = "torch._dynamo.symbolic_convert.__graph_breaks"
_AT = re.compile(r"Graph break .*in user code at (.+):(\d+)")


def _graph_break(message: str) -> GraphBreak | None:
    at = _AT.search(message)
    if at is None:
        return None
    lines = [line.strip() for line in message.split("Graph Break Reason:", 1)[-1].split("User code traceback:")[0]
             .splitlines()]
    kinds = [line for line in lines if line and not line.startswith((
        "Explanation:", "Hint:", "Developer debug context:", "For more", "Failed to handle", "*** While handling",
        "Encountered graph break when attempting to trace"))]
    explanations = [line.removeprefix("Explanation: ") for line in lines if line.startswith("Explanation:")]
    reason = ": ".join(kinds[:1] + explanations[:1]) or lines[0]
    return GraphBreak(Where("", f"{at.group(1)}:{at.group(2)}"), reason, "falling back to eager" in message)


@contextlib.contextmanager
def graph_breaks() -> Iterator[list[GraphBreak]]:
    """The graph breaks Dynamo meets while the block runs, read off its graph-break log (enabled for the block
    only, printing nothing unless asked for; its once-per-place filter cleared, so a model explained twice is
    told twice). Their module is not known here (`GraphBreak.where.module` is empty)."""
    found: list[GraphBreak] = []

    class Collect(logging.Handler):
        """One break per line: Dynamo logs a break again as it unwinds (the last says why, and whether it
        then skipped the function)."""
        def emit(self, record: logging.LogRecord) -> None:
            brk = _graph_break(record.getMessage())
            if brk is None:
                return
            earlier = next((i for i, b in enumerate(found) if b.where == brk.where), None)
            if earlier is None:
                found.append(brk)
            else:
                found[earlier] = GraphBreak(brk.where, brk.reason, brk.skipped or found[earlier].skipped)

    logger, handler = logging.getLogger(_GRAPH_BREAK_LOGGER), Collect(logging.DEBUG)
    level, propagate = logger.level, logger.propagate
    quiet = not logger.isEnabledFor(logging.DEBUG)  # else the user asked for them (TORCH_LOGS=graph_breaks)
    checker = getattr(torch._dynamo.utils, "graph_break_dup_warning_checker", None)
    if checker is not None:
        checker.reset()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = propagate and not quiet
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


SMALL = 1 << 16  # elements: a value this small is kept whatever reads it (mask builders, position tables)


def stash_values(gm: fx.GraphModule, inputs: list, matches: list) -> dict[fx.Node, Any]:
    """The real values verification reads, from one run of `gm` on `inputs` under no_grad: what each match's
    nodes read and its output, and every small value (what a replacement may read besides, e.g. a padding table
    behind a recognized mask). Nothing else is kept, so a large model's activations are not all held at
    once. Inputs the graph writes into are cloned first; the others are read as they are."""
    keep = {node for m in matches for node in m.outputs}
    for m in matches:  # a chain's states inside the match are not kept (T states would not fit)
        inside = set(m.nodes)
        keep |= {node for n in m.nodes for node in n.all_input_nodes if node not in inside}
    written = _written_inputs(gm.graph)
    run_inputs = [x.clone() if isinstance(x, torch.Tensor) and i in written else _concrete(x) for i, x in enumerate(inputs)]
    values: dict[fx.Node, Any] = {}

    class Stash(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in keep or not isinstance(result, torch.Tensor) or result.numel() <= SMALL:
                values[n] = result
            return result

    with torch.no_grad():
        Stash(gm).run(*run_inputs)
    return values


def _concrete(x: Any) -> Any:
    """A size Dynamo made symbolic as the value it has in this call (its hint)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint if x.node.hint is not None else x.node.require_hint()
    return x


def _written_inputs(graph: fx.Graph) -> set[int]:
    """Positions of the placeholders some node writes into, directly or through a tensor sharing their storage."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    targets = {alias for node in graph.nodes for target in written(node) for alias in alias_class(target)}
    return {i for i, node in enumerate(placeholders) if node in targets}
