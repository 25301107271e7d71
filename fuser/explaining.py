"""`fuser.explain(model, *args, **kwargs)`: what the backend would rewrite, without compiling anything.

The model runs once under Dynamo; each captured graph is rewritten on a copy (so no kernel
is launched or compiled) while the original graph runs, and the reports are gathered.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from fuser.backend import Options, transform
from fuser.report import Report


def explain(model: Any, *args: Any, options: dict | None = None, **kwargs: Any) -> Report:
    """Report the matches and near misses of `model(*args, **kwargs)` (a module or a function)."""
    opts = Options.parse(options)
    report = Report()

    def backend(gm: torch.fx.GraphModule, example_inputs: list, **_: Any):
        report.extend(transform(copy.deepcopy(gm), example_inputs, opts))
        return gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return report
