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

import copy
import itertools
import types
from typing import Any, Callable

import torch
from torch import fx


def _call(target, args, kwargs):
    return target(*args, **kwargs)


_captures = itertools.count()


def capture(target: Callable, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool | None = False,
            fullgraph: bool = False) -> list[tuple[fx.GraphModule, list]]:
    """(graph module, example inputs) of each graph Dynamo captures for `target(*args, **kwargs)`,
    run once under no_grad; the graphs are copies, free to rewrite."""
    captured = []

    def backend(gm: fx.GraphModule, example_inputs: list, **_: Any):
        captured.append((copy.deepcopy(gm), list(example_inputs)))
        return gm.forward

    name = f"_capture_{next(_captures)}"
    caller = types.FunctionType(_call.__code__.replace(co_name=name, co_qualname=name), _call.__globals__, name)
    with torch.no_grad():
        torch.compile(caller, backend=backend, dynamic=dynamic, fullgraph=fullgraph)(target, args, kwargs or {})
    return captured
