"""The `torch.compile(model, backend="fuser")` entry point (entry point group `torch_dynamo_backends`).

Dynamo hands over each captured torch-level graph; it is rewritten (fused ops in place of
the naive code) and the rest of the graph goes to Inductor (default) or runs eagerly.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from torch import fx
from torch._dynamo.exc import RestartAnalysis

from fuser.cuda_graphs import eager_with_cuda_graphs, inductor_config, require_cuda
from fuser.logs import step
from fuser.options import Options
from fuser.report import Report
from fuser.engine.rewriter import rewrite

_reports: list[Report] = []


def last_report() -> Report:
    """Everything the backend rewrote (and did not) in the graphs of the latest compilation(s)."""
    merged = Report()
    for report in _reports:
        merged.extend(report)
    return merged


def reset_reports() -> None:
    _reports.clear()


def fuser_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                  mode: str | None = None, **_: Any) -> Callable:
    """Dynamo backend: rewrite, then compile the rest with Inductor (honouring `mode`) or run it eagerly, as CUDA
    graphs where the options ask. Where nothing is rewritten, Inductor gets Dynamo's graph as plain torch.compile
    would."""
    opts = Options.parse(options)
    if opts.cudagraphs:
        require_cuda()
    _graphs[0] += 1
    with step(f"fuser: graph {_graphs[0]}: rewriting{'' if opts.codegen == 'eager' else ', then Inductor'}"):
        return _compile(gm, example_inputs, opts, mode)


_graphs = [0]  # graphs this process compiled, to number their progress


def _compile(gm: fx.GraphModule, example_inputs: list, opts: Options, mode: str | None) -> Callable:
    gm, report = rewrite(gm, opts.selected_patterns(), example_inputs, verify=opts.verify, strict=opts.strict,
                         pictures=opts.pictures)
    _reports.append(report)
    if opts.codegen == "eager":
        return eager_with_cuda_graphs(gm, example_inputs) if opts.cudagraphs else gm.forward
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    # AOTAutograd's cache keys a graph by its forward: a cached backward would outlive a change to a
    # fused op's Python autograd (seen: a stale backward calling an op with its old arguments)
    fresh_autograd = functorch_config.patch(enable_autograd_cache=False) \
        if report.matches and hasattr(functorch_config, "enable_autograd_cache") else contextlib.nullcontext()
    try:
        with fresh_autograd:
            return compile_fx(gm, example_inputs, config_patches=inductor_config(mode, opts.cudagraphs))
    except RestartAnalysis:
        # Dynamo traces the code again (Inductor specializes a float that dynamic=True made a graph input, when
        # an op takes it as a number): this graph never runs, the next one gets its own report
        _reports.remove(report)
        raise

