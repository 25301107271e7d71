"""Graph rewriting of whole modules, for `fuser.convert(model, *example_inputs)`.

A module that convert's module-level converters (norms, MoE blocks) and transformers' attention
interface leave alone may still compute a pattern: a hand-written attention, an RMSNorm spelled
inside a block, a softmax. Each module is tried, children before parents:
- its forward is captured whole by Dynamo (`torch._dynamo.export`) on the arguments it received in
  one calibration run of the model, sizes symbolic (so the graph serves other batches and lengths);
  side effects are refused, since a graph would drop them;
- the backend's rewriter rewrites it: the same patterns, checks, per-site verification and records;
- a module is rewritten for the sites it owns: a site belongs to the module that computes its output,
  or the nearest module above that the pass tries (modules of torch.nn itself are part of their
  caller's code); one inside a module another converter handles is that converter's. So the smallest
  module that holds a site is the one rewritten, and no site is counted twice;
- the rewritten forward is checked as a whole against the original graph in float64, on the recorded
  arguments and on random ones of the same shapes: outputs, and the gradients of floating inputs and
  of parameters when the module trains or its parameters require grad;
- it is installed (`fuser.modules.swap`) as a `ModuleGraph` (`fuser.modules.module_graphs`): the graph
  reads the module's parameters at each call (state_dict unchanged) and runs only for calls like the
  captured one; attributes the forward reads (a head count) are taken as they were.
A module whose forward cannot be captured whole is left as it is; where a pattern shows in its
partial graphs (captured on a copy, so its side effects stay there), that is a near miss saying why.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from fuser.engine.canonical import where
from fuser.engine.capture import capture
from fuser.engine.canonical import canonicalize
from fuser.engine.rewriter import apply, decide
from fuser.modules.module_check import check_module_graph
from fuser.modules.module_graphs import (Call, ModuleGraph, buffers_kept, capture_failure, export_forward, module_graph,
                                         program_of, record_calls)
from fuser.options import Options
from fuser.report import NearMiss, Report, Where


@dataclass(frozen=True)
class Rewritten:
    """A module whose rewritten forward passed every check, ready to be installed."""
    name: str
    module: nn.Module
    graph: ModuleGraph
    report: Report      # its own matches (and near misses), with the before/after pictures of its graph


def _joined(name: str, relative: str) -> str:
    return f"{name}.{relative}" if name and relative else name or relative


class _Ownership:
    """Which module a site belongs to: walking up from the module that computes its output (the value a rewrite
    replaces), the first module the pass tries or another converter handles (modules of torch.nn itself are
    neither: their code belongs to whoever calls them)."""

    def __init__(self, candidates: set[str], handled: set[str]):
        self.candidates, self.handled = candidates, handled

    def owner(self, path: str, name: str) -> str | None:
        """Of a site at `path` in the graph of module `name`; None where another converter handles it."""
        while path != name and path not in self.candidates and path not in self.handled:
            path = path.rpartition(".")[0]
        return None if path in self.handled else path


def _own_records(report: Report, name: str, paths: dict[str, str], ownership: _Ownership) -> Report:
    """The matches and near misses of module `name`'s graph that belong to that module, placed in the model."""
    def placed(record: Any) -> Any:
        site = paths.get(record.nodes[-1], record.where.module) if record.nodes else record.where.module
        return dataclasses.replace(record, where=Where(_joined(name, site), record.where.location))

    def own(records: list) -> list:
        return [r for r in map(placed, records) if ownership.owner(r.where.module, name) == name]

    return Report(own(report.matches), own(report.near_misses), report.graphs)


def _module_paths(graph: fx.Graph, root: nn.Module) -> dict[str, str]:
    """For each node, the path in `root` of the module whose code made it. Dynamo's nn_module_stack is keyed by
    the modules' ids; its path strings name them through whatever Dynamo traced from (`L['fn'].__self__...`)."""
    names = {str(id(m)): name for name, m in root.named_modules(remove_duplicate=False)}

    def path(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack")
        return names.get(list(stack)[-1].split("@")[0], where(node)[0]) if stack else ""

    return {node.name: path(node) for node in graph.nodes}


def _rewrite(gm: fx.GraphModule, root: nn.Module, example_inputs: list,
             options: Options) -> tuple[fx.GraphModule, Report, dict[str, str]]:
    """The backend's rewrite of `gm` (a graph of `root`) in place: `gm`, its report, and the module path of each node
    of its canonical graph."""
    canonicalize(gm.graph)  # in place: these graphs are convert's own copies, pickled with the module
    paths = _module_paths(gm.graph, root)  # before the rewrite erases the matched nodes
    decided = decide(gm, options.selected_patterns(), example_inputs, verify=options.verify, strict=options.strict)
    return gm, apply(decided, strict=options.strict, pictures=True), paths


def _untraceable(name: str, module: nn.Module, call: Call, reason: str, ownership: _Ownership) -> Report:
    """Near misses for the patterns in the partial graphs of a forward that cannot be captured whole."""
    report = Report()
    try:
        args, kwargs = call.fresh()
        copied = copy.deepcopy(module)
        graphs = capture(copied, args, kwargs)
    except Exception:  # nothing more to learn about a forward Dynamo cannot even run in pieces
        return report
    for gm, example_inputs in graphs:
        _, found, paths = _rewrite(gm, copied, example_inputs, Options(verify=False))
        own = _own_records(found, name, paths, ownership)
        report.near_misses += [NearMiss(m.pattern, m.where, f"its module's forward cannot be captured as one graph "
                                        f"({reason}); left as it is", m.nodes) for m in own.matches]
        report.near_misses += own.near_misses
    return report


def _rewrite_module(name: str, module: nn.Module, call: Call, ownership: _Ownership) -> Rewritten | Report:
    """Capture, rewrite and check one module: what to install, or the report of why not (maybe empty)."""
    unsupported = call.unsupported_argument()
    if unsupported is not None:
        return _untraceable(name, module, call, unsupported, ownership)
    try:
        exported = export_forward(module, call)
    except Exception as error:  # Dynamo's refusals take many forms; each is a reason to leave the module alone
        return _untraceable(name, module, call, capture_failure(error), ownership)
    program = program_of(exported, module)
    original = copy.deepcopy(program.graph)
    rewritten, found, paths = _rewrite(program, module, [module, *call.leaves()], Options(verify=True))
    own = _own_records(found, name, paths, ownership)
    if not own.matches:
        return Report([], own.near_misses)
    checked = check_module_graph(module, original, rewritten, call)
    if checked.problem is not None:
        return Report([], [NearMiss(m.pattern, m.where, f"{checked.problem}; kept the original", m.nodes)
                           for m in own.matches] + own.near_misses)
    if checked.without_gradients:
        names = call.argument_names(module.forward)
        own.notes.append(f"{name or type(module).__name__} runs its rewritten graph only where "
                         f"{', '.join(names[i] for i in checked.without_gradients)} needs no gradient "
                         "(the fused ops give none for it)")
    return Rewritten(name, module, module_graph(rewritten, exported, module, call, checked.without_gradients), own)


def rewrite_modules(model: nn.Module, args: tuple, kwargs: dict, handled: set[nn.Module]) -> tuple[list[Rewritten], Report]:
    """Every module of `model` outside `handled` (and their submodules) whose forward holds a pattern, rewritten
    and checked on the calls of one run of `model(*args, **kwargs)`; and the report of the rest."""
    handled_names = {_joined(name, sub) for name, m in model.named_modules() if m in handled
                     for sub, _ in m.named_modules()}
    tried = {name: m for name, m in model.named_modules()
             if name not in handled_names and not type(m).__module__.startswith("torch.")}
    report, rewritten = Report(), []
    with buffers_kept(model):
        calls = record_calls(model, args, kwargs, tried.values())
        ownership = _Ownership({name for name, m in tried.items() if m in calls}, handled_names)
        for name, module in reversed(list(tried.items())):  # children first
            if module in calls:
                try:
                    outcome = _rewrite_module(name, module, calls[module], ownership)
                except Exception as error:  # a bug here must not break the user's model: the module stays as it is
                    outcome = Report(notes=[f"{name or type(module).__name__}: graph rewriting failed "
                                            f"({type(error).__name__}: {error}); left as it is"])
                if isinstance(outcome, Rewritten):
                    rewritten.append(outcome)
                    report.extend(outcome.report)
                else:
                    report.extend(outcome)
    return rewritten, report
