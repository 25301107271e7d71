"""Shared by the tests: capture a function's Dynamo graphs, compile with fuser and count rewrites."""
from __future__ import annotations

import copy

import torch

import fuser


def captured_graphs(fn, *args, **kwargs) -> list[torch.fx.GraphModule]:
    """The torch-level graphs Dynamo captures for `fn(*args, **kwargs)` (with example values in meta)."""
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append((copy.deepcopy(gm), example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    return graphs


def compile_and_run(fn, *args, options=None, **kwargs):
    """(output, report) of `fn` compiled with backend="fuser" (eager codegen unless options say)."""
    torch._dynamo.reset()
    fuser.reset_reports()
    options = {"codegen": "eager", **(options or {})}
    out = torch.compile(fn, backend="fuser", options=options)(*args, **kwargs)
    return out, fuser.last_report()


def float64_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `model` for the numerics contract (experts through the plain loop:
    grouped_mm has no float64 kernel)."""
    reference = copy.deepcopy(model).double()
    if getattr(reference.config, "_experts_implementation", None) is not None:
        reference.config._experts_implementation = "eager"
    return reference


def assert_compiled_matches_eager(fn, forward_backward, backend) -> None:
    """`forward_backward(fn)` (same seed) gives bit for bit the same values with `fn` compiled fullgraph."""
    torch.manual_seed(0)
    eager = forward_backward(fn)
    torch.manual_seed(0)
    compiled = forward_backward(torch.compile(fn, backend=backend, fullgraph=True))
    for ours, theirs in zip(compiled, eager):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
