"""`fuser.explain(model, *args, **kwargs)`: what the backend would rewrite, without compiling anything.

The model runs once under Dynamo (through `fuser.engine.capture`, so that explaining the same model
class many times never meets Dynamo's recompile limit); each captured graph is planned and rewritten on a
canonical copy (with the same verification as the backend), so nothing is compiled, and the reports are gathered.
Dynamo's graph breaks are reported too, since the code around them reaches no pattern: where (the module and
line), Dynamo's reason, and, where a module-level converter of `fuser.convert` takes the module that holds the
break (a hand-written loop MoE block on which Dynamo falls back to eager), what convert would run instead.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from fuser.engine.capture import capture, graph_breaks
from fuser.engine.rewriter import rewrite
from fuser.modules.converters import MODULE_CONVERTERS
from fuser.modules.swap import Swap
from fuser.options import Options
from fuser.report import GraphBreak, Report


def explain(model: Any, *args: Any, options: dict | None = None, **kwargs: Any) -> Report:
    """Report the matches and near misses of `model(*args, **kwargs)` (a module or a function), decided as
    `torch.compile(model, backend="fuser")` decides them in the caller's grad mode (under `torch.no_grad()`
    for inference: a site that must give a gradient, such as a learned bias, is decided differently), and
    Dynamo's graph breaks."""
    opts = Options.parse(options)
    report = Report()
    with graph_breaks() as breaks:
        captured = capture(model, args, kwargs, grad=torch.is_grad_enabled())
    for graph, example_inputs in captured:
        report.extend(rewrite(graph, opts.selected_patterns(), example_inputs, verify=opts.verify, strict=opts.strict,
                              pictures=True)[1])
    report.graph_breaks = [_placed(brk, model) for brk in breaks]
    return report


def _placed(brk: GraphBreak, model: Any) -> GraphBreak:
    """The break with the innermost modules whose forward holds its line (every instance of that class), and what
    convert would do with the first."""
    if not isinstance(model, nn.Module):
        return brk
    file, _, line = brk.where.location.rpartition(":")
    holders = [(name, module) for name, module in model.named_modules() if _holds(type(module), file, int(line))]
    if not holders:
        return brk
    innermost = [(n, m) for n, m in holders if not any(o.startswith(f"{n}.") or not n and o for o, _ in holders)]
    name, module = innermost[0]
    where = dataclasses.replace(brk.where, module=", ".join(n for n, _ in innermost))
    return GraphBreak(where, brk.reason, brk.skipped, _converted(name, module))


def _holds(cls: type, file: str, line: int) -> bool:
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    try:
        lines, start = inspect.getsourcelines(forward)
        return inspect.getsourcefile(forward) == file and start <= line < start + len(lines)
    except (OSError, TypeError):
        return False


def _converted(name: str, module: nn.Module) -> str:
    """What a module-level converter of `fuser.convert` runs for this module (checked as convert checks it),
    or empty."""
    for converter in MODULE_CONVERTERS:
        if converter.candidate(module):
            outcome = converter.prepare(name, module, {})
            if isinstance(outcome, Swap):
                return "fuser.convert(model) fuses it: " + "; ".join(
                    f"{r.op} ({r.mode})" for r in outcome.records)
    return ""
