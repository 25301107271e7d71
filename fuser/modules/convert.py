"""`fuser.convert(model)`: the same model object, running the fused kernels without torch.compile.

- Modules, by the module-level converters (`fuser.modules.converters`), which need no example inputs:
  a module whose whole forward the backend's patterns turn into one fused op (an RMSNorm into
  `fuser::rms_norm`), and hand-written loop MoE blocks (`fuser.modules.moe_blocks`). Each is checked
  against its own code run in float64 (its gradients too when it trains or its parameters require
  grad), and only then swapped (`fuser.modules.swap`) to a subclass of its class that runs the fused
  call: the same parameters (state_dict keys and tensors unchanged), `isinstance` still true.
- Attention and MoE experts, in transformers models, through transformers' attention and experts
  interfaces (`fuser.integrations.transformers`): the model switches to the "fuser" implementations
  when every layer passes only what they implement and every experts module passes its check against
  its own code in float64; otherwise every layer stays as it was, with a near miss saying why.
- Multi-head latent attention layers (DeepSeek-V2/V3), whose decode steps switch to the latent space
  (`fuser.integrations.latent_attention`) after a decode step agrees with their own forward in float64.
- Any other module, by rewriting its graph (`fuser.modules.module_rewriting`), when convert is given example
  inputs (`convert(model, *args, **kwargs)`, a call of the model): one calibration run records each
  module's arguments, and the smallest modules whose forward holds a pattern are captured, rewritten
  by the backend's rewriter, checked as a whole in float64 (gradients included) and switched to
  their rewritten graph for calls like the recorded one.

`convert(model, dry_run=True)` makes every check and returns the report without changing anything.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from fuser.integrations.latent_attention import convert_latent_attention
from fuser.integrations.linear_attention import (RebindsKernelFunctions, convert_linear_attention,
                                                 dispatches_linear_attention)
from fuser.integrations.transformers import convert_attention, convert_experts, dispatches_attention, dispatches_experts
from fuser.modules.converters import convert_modules
from fuser.modules.module_rewriting import rewrite_modules
from fuser.modules.swap import FusedModule, Swap
from fuser.report import Report

WITHOUT_EXAMPLES = ("no example inputs, so only norms, MoE blocks and transformers' attention were tried; "
                    "fuser.convert(model, *args, **kwargs) with a call of the model rewrites other modules' "
                    "graphs too (hand-written attention, say)")

log = logging.getLogger("fuser.convert")


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(f"{module}.") or not module


def _rewrite_module_graphs(model: nn.Module, args: tuple, kwargs: dict, report: Report, swaps: list[Swap]) -> None:
    """Graph rewriting of the modules no other converter handles (see `fuser.modules.module_rewriting`). Where it has
    its own word on a module a module-level converter turned down (a norm whose forward does more than
    the norm, say), that replaces the converter's near miss."""
    handled = {swap.module for swap in swaps} | {m for m in model.modules() if dispatches_attention(m)
                                                 or dispatches_experts(m) or dispatches_linear_attention(m)
                                                 or isinstance(m, (FusedModule, RebindsKernelFunctions))}
    rewritten, found = rewrite_modules(model, args, kwargs, handled)
    sites = [r.where.module for r in (*found.matches, *found.near_misses)]
    report.near_misses = [n for n in report.near_misses if not any(_within(site, n.where.module) for site in sites)]
    report.extend(found)
    swaps += [Swap(r.module, tuple(r.report.matches), r.graph) for r in rewritten]


def convert(model: nn.Module, *example_args: Any, dry_run: bool = False, **example_kwargs: Any) -> nn.Module | Report:
    """Switch `model` (in place) to fuser's kernels and return it; with `dry_run`, change nothing and
    return the report of what would be converted and what would not, and why.

    Example inputs, a call of the model (`model(*example_args, **example_kwargs)`), let convert rewrite
    the graphs of the modules no module-level converter handles (see `fuser.modules.module_rewriting`); without
    them only norms, MoE blocks and transformers' attention are converted, and the report says so."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuser.convert takes a torch.nn.Module, not {type(model).__name__}; "
                        "for a function use torch.compile(fn, backend='fuser')")
    report = Report()
    swaps = convert_modules(model, report)
    if example_args or example_kwargs:
        _rewrite_module_graphs(model, example_args, example_kwargs, report, swaps)
    else:
        report.notes.append(WITHOUT_EXAMPLES)
    convert_attention(model, report, dry_run, example_args, example_kwargs)
    convert_latent_attention(model, report, dry_run)  # after convert_attention: see its docstring
    convert_experts(model, report, dry_run)
    convert_linear_attention(model, report, dry_run)
    if dry_run:
        return report
    for swap in swaps:
        swap.apply()
    log.info("%s", report)
    return model
