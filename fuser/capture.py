"""Capturing the torch-level graphs Dynamo makes of a call, without compiling anything.

Dynamo keeps what it compiles on the code object of the frame it starts from, and after
`recompile_limit` (8) versions of one code object it stops compiling that code and runs it
as is. Capturing the same module class many times (every norm of a model, a test suite
explaining one architecture again and again) would reach that limit and then capture nothing.
So each capture starts from a fresh copy of a one-line caller's code: its cache entries are
its own and go away with it; the model's code objects are left untouched.
"""
from __future__ import annotations

import copy
import types
from typing import Any, Callable

import torch
from torch import fx


def _call(target, args, kwargs):
    return target(*args, **kwargs)


def capture(target: Callable, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool | None = False,
            fullgraph: bool = False) -> list[tuple[fx.GraphModule, list]]:
    """(graph module, example inputs) of each graph Dynamo captures for `target(*args, **kwargs)`,
    run once under no_grad; the graphs are copies, free to rewrite."""
    captured = []

    def backend(gm: fx.GraphModule, example_inputs: list, **_: Any):
        captured.append((copy.deepcopy(gm), list(example_inputs)))
        return gm.forward

    caller = types.FunctionType(_call.__code__.replace(), _call.__globals__, "_call")
    with torch.no_grad():
        torch.compile(caller, backend=backend, dynamic=dynamic, fullgraph=fullgraph)(target, args, kwargs or {})
    return captured
