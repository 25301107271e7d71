"""`fuser.explain(model, *args, **kwargs)`: what the backend would rewrite, without compiling anything.

The model runs once under Dynamo (through `fuser.engine.capture`, so that explaining the same model
class many times never meets Dynamo's recompile limit); each captured graph is planned and rewritten on a
canonical copy (with the same verification as the backend), so nothing is compiled, and the reports are gathered.
"""
from __future__ import annotations

from typing import Any

import torch

from fuser.engine.capture import capture
from fuser.engine.rewriter import rewrite
from fuser.options import Options
from fuser.report import Report


def explain(model: Any, *args: Any, options: dict | None = None, **kwargs: Any) -> Report:
    """Report the matches and near misses of `model(*args, **kwargs)` (a module or a function), decided as
    `torch.compile(model, backend="fuser")` decides them in the caller's grad mode (under `torch.no_grad()`
    for inference: a site that must give a gradient, such as a learned bias, is decided differently)."""
    opts = Options.parse(options)
    report = Report()
    for graph, example_inputs in capture(model, args, kwargs, grad=torch.is_grad_enabled()):
        report.extend(rewrite(graph, opts.selected_patterns(), example_inputs, verify=opts.verify, strict=opts.strict,
                              pictures=True)[1])
    return report
