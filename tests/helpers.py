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


def loss_step(model, ids, options=None):
    """(logits, gradients by parameter name, report) of one loss and backward; compiled whole (fullgraph: no graph
    break) with backend="fuser" when options are given."""
    model.zero_grad()
    run, report = model, None
    if options is not None:
        torch._dynamo.reset()
        fuser.reset_reports()
        run = torch.compile(model, backend="fuser", fullgraph=True, options=options)
    out = run(ids, labels=ids)
    out.loss.backward()
    if options is not None:
        report = fuser.last_report()
    return out.logits, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, report


def compiled_with_padding(model, ids, padding: bool, padded_keys: int, output: str):
    """(compiled, eager, float64 outputs, report) of `model(ids)` under backend="fuser" (eager codegen, strict),
    with the first `padded_keys` tokens of sequence 0 masked out when `padding`; `output` names the result field."""
    mask = torch.ones_like(ids)
    mask[0, :padded_keys] = 0
    kwargs = {"attention_mask": mask} if padding else {}
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        compiled = getattr(torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(
            ids, **kwargs), output)
        original = getattr(model(ids, **kwargs), output)
        reference = getattr(float64_reference(model)(ids, **kwargs), output)
    return compiled, original, reference, fuser.last_report()
