"""The `torch.compile(model, backend="fuser")` entry point (entry point group `torch_dynamo_backends`).

Dynamo hands over each captured torch-level graph; it is rewritten (fused ops in place of
the naive code) and the rest of the graph goes to Inductor (default) or runs eagerly.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable

from torch import fx

from fuser.cuda_graphs import eager_with_cuda_graphs, inductor_config, require_cuda
from fuser.options import Options
from fuser.report import Report
from fuser.report.graphs import graph_to_networkx
from fuser.engine.rewriter import prepare, rewrite
from fuser.numerics.contract import capture_values

_reports: list[Report] = []
_graph_ids = itertools.count()


def last_report() -> Report:
    """Everything the backend rewrote (and did not) in the graphs of the latest compilation(s)."""
    merged = Report()
    for report in _reports:
        merged.extend(report)
    return merged


def reset_reports() -> None:
    _reports.clear()


def transform(gm: fx.GraphModule, example_inputs: list, options: Options) -> Report:
    """Canonicalize and rewrite `gm` in place; return the report."""
    prepare(gm)
    return rewrite_prepared(gm, example_inputs, options)


def rewrite_prepared(gm: fx.GraphModule, example_inputs: list, options: Options) -> Report:
    """`transform` of a graph `prepare` has canonicalized already (for callers that read it in between)."""
    values = capture_values(gm, example_inputs) if options.verify else None
    tag = f"g{next(_graph_ids)}."
    before = graph_to_networkx(gm.graph, tag)
    report = rewrite(gm, options.selected_patterns(), strict=options.strict, verify_values=values, tag=tag)
    for match in report.matches:
        for name in match.nodes:
            before.nodes[tag + name]["match"] = match.id
    report.graphs.append((before, graph_to_networkx(gm.graph, tag)))
    return report


def fuser_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                  mode: str | None = None, **_: Any) -> Callable:
    """Dynamo backend: rewrite, then compile the rest with Inductor (honouring `mode`) or run it eagerly,
    as CUDA graphs where the options ask."""
    opts = Options.parse(options)
    if opts.cudagraphs:
        require_cuda()
    report = transform(gm, example_inputs, opts)
    _reports.append(report)
    if opts.codegen == "eager":
        return eager_with_cuda_graphs(gm, example_inputs) if opts.cudagraphs else gm.forward
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    # AOTAutograd's cache keys a graph by its forward: a cached backward would outlive a change to a
    # fused op's Python autograd (seen: a stale backward calling an op with its old arguments)
    fresh_autograd = functorch_config.patch(enable_autograd_cache=False) \
        if report.matches and hasattr(functorch_config, "enable_autograd_cache") else contextlib.nullcontext()
    with fresh_autograd:
        return compile_fx(gm, example_inputs, config_patches=inductor_config(mode, opts.cudagraphs))

