"""Module-level converters for `fuser.convert`: modules converted whole, without example inputs.

- Modules whose whole forward the backend's patterns turn into one fused op (an RMSNorm into
  `fuser::rms_norm`): captured by Dynamo on a small random input, checked on random inputs of other
  shapes against their own code run in float64 (gradients too when the module trains or its parameters
  require grad), and only then swapped (`fuser.modules.swap`) to run the op (a `OneOpCall`).
- Hand-written loop MoE blocks, checked by `fuser.modules.moe_blocks.match_moe_module`.
Each converter prepares a checked `Swap`, or says why a module is left as it was (a near miss).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from fuser.engine.capture import capture
from fuser.engine.rewriter import canonical_copy, rewrite
from fuser.modules.moe_blocks import looks_like_moe_block, match_moe_module
from fuser.modules.swap import FusedModule, Swap
from fuser.numerics.contract import Run, gradient_problems, judge
from fuser.numerics.float64 import leaf64, run_nodes
from fuser.options import Options
from fuser.report import MatchRecord, NearMiss, Report, Where


@dataclass(frozen=True)
class ModuleConverter:
    """Converts modules of one kind. `candidate(module)` is a cheap test of whether to try;
    `prepare(name, module, memo)` returns a checked `Swap`, the reason the module is left as it
    was (a near miss), or None when the module is not of this kind at all. `memo` is a dict the
    converter keeps for one `convert` call: work shared by the modules of one model."""
    pattern: str
    candidate: Callable[[nn.Module], bool]
    prepare: Callable[[str, nn.Module, dict], "Swap | str | None"]


# ---------------------------------------------------------------------------------------------
# Modules whose forward is one fused op
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OneOpCall:
    """The op a module's forward became, with its arguments: the module's input, one of its
    parameters by name, or a literal read off the graph (eps, say). Valid for the dtypes it was
    checked with; other dtypes run the module's own forward."""
    op_name: str                 # "fuser::rms_norm" (the op itself does not pickle)
    arguments: tuple[Any, ...]   # ("input",), ("parameter", name) or ("literal", value)
    input_dtype: torch.dtype
    parameter_dtypes: tuple[tuple[str, torch.dtype], ...]

    def accepts(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].dtype == self.input_dtype \
            and all(getattr(module, name).dtype == dtype for name, dtype in self.parameter_dtypes)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        (x,) = args

        def argument(arg: tuple) -> Any:
            kind = arg[0]
            return x if kind == "input" else getattr(module, arg[1]) if kind == "parameter" else arg[1]
        namespace, op = self.op_name.split("::")
        return getattr(getattr(torch.ops, namespace), op)(*map(argument, self.arguments))


def _capture(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list]:
    """Dynamo's graph of `module(x)` (one graph, sizes fixed)."""
    captured = capture(module, (x,), fullgraph=True)
    if not captured:
        raise RuntimeError("Dynamo captured no graph")
    return captured[0]


@dataclass(frozen=True)
class OneOpForward:
    """What a module's forward is, read off its captured graph: the original graph (canonical,
    for the float64 reference) and the one op it was rewritten into, with its arguments."""
    graph: fx.GraphModule
    inputs: tuple[tuple, ...]        # per placeholder: ("input",) or ("parameter", name)
    arguments: tuple[tuple, ...]     # of the op, as `OneOpCall.arguments`
    record: MatchRecord              # the rewrite: its op's name, mode, the nodes it replaced


def _one_op_forward(module: nn.Module, x: torch.Tensor, pattern: str) -> OneOpForward | str | None:
    """Capture `module(x)` and rewrite it with `pattern`: the result when the forward became one op;
    else the near miss reason, or None when the pattern found nothing like itself there."""
    try:
        gm, example_inputs = _capture(module, x)
    except Exception as error:  # a forward Dynamo cannot capture whole is not one op
        return f"its forward cannot be captured as one graph ({type(error).__name__}: {error})"
    original = canonical_copy(gm)
    gm, report = rewrite(gm, [p for p in Options().selected_patterns() if p.name == pattern])
    if not report.matches:
        return report.near_misses[0].reason if report.near_misses else None
    parameters = {id(p): name for name, p in module.named_parameters(recurse=False)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    role = {node: ("input",) if example is x else ("parameter", parameters.get(id(example), None))
            for node, example in zip(placeholders, example_inputs)}
    if any(r == ("parameter", None) for r in role.values()):
        return "the forward reads a tensor that is neither its input nor one of its parameters"
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    if len(calls) != 1 or result is not calls[0]:
        names = [n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)) for n in calls]
        return f"its forward is more than the {pattern} (it computes {', '.join(names)})"
    arguments = tuple(role[a] if isinstance(a, fx.Node) else ("literal", a) for a in calls[0].args)
    return OneOpForward(original, tuple(role[n] for n in placeholders), arguments, report.matches[0])


def _check_fused_call(call: OneOpCall, module: nn.Module, forward: OneOpForward) -> str | None:
    """The fused call against the module's captured graph run in float64, on random inputs of
    several shapes and scales; its gradients too (input and parameters) when the module trains or
    its parameters require grad. The module's own forward must agree with that graph too: the
    graph may have been captured on another module of the same class and settings."""
    generator = torch.Generator().manual_seed(0)
    graph = forward.graph.graph
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    parameters = dict(module.named_parameters(recurse=False))
    trained = [name for name, p in parameters.items() if p.requires_grad]
    gradients = module.training or bool(trained)
    hidden = next(module.parameters()).shape[-1]
    for shape, scale in (((1, 1, hidden), 1.0), ((3, 7, hidden), 1.0), ((2, 5, hidden), 50.0)):
        x = (torch.randn(shape, generator=generator) * scale).to(call.input_dtype).to(_device(module))
        x_fused, x_own, x64 = (t.requires_grad_(gradients) for t in (x.clone(), x.clone(), x.double()))
        parameters64 = {name: leaf64(p, name in trained) for name, p in parameters.items()}
        inputs = {node: x64 if role == ("input",) else parameters64[role[1]]
                  for node, role in zip(placeholders, forward.inputs)}
        with torch.enable_grad() if gradients else torch.no_grad():
            ref = run_nodes(nodes, inputs, float64=True)
            fused, own = call(module, (x_fused,), {}), module(x_own)
            problem = _forward_problem(fused, own, ref)
            if problem is None and gradients:
                trained_parameters = [parameters[n] for n in trained]
                problems = gradient_problems(["the input", *trained], Run([fused], [x_fused, *trained_parameters]),
                                             Run([own], [x_own, *trained_parameters]),
                                             Run([ref], [x64, *(parameters64[n] for n in trained)]), generator)
                problem = next((f"the fused op: {p}" for p in problems if p), None)
        if problem is not None:
            return f"on a random input of shape {list(shape)}, {problem}; kept the original"
    return None


def _forward_problem(fused: torch.Tensor, own: torch.Tensor, ref: torch.Tensor) -> str | None:
    """The fused op must meet the contract, and the module's own forward compute the captured graph's function
    (`judge` with no `own`: it is the original)."""
    for what, verdict in (("the fused op", judge(fused, ref, own=own)), ("the module's own forward", judge(own, ref))):
        if verdict.problem is not None:
            return f"{what}: {verdict.problem}"
    return None


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _settings(module: nn.Module) -> tuple:
    """What makes two modules of one class capture the same graph: their parameters' shapes and
    dtypes, and their plain attributes (eps, say); Dynamo specializes on exactly these."""
    parameters = tuple((n, tuple(p.shape), p.dtype, p.device.type) for n, p in module.named_parameters(recurse=False))
    plain = tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, type(None)))))
    return type(module), parameters, plain


def single_op_converter(pattern: str, candidate: Callable[[nn.Module], bool]) -> ModuleConverter:
    """A converter for modules whose whole forward `pattern` rewrites into one op. Modules of the
    same class and settings share one capture (a model has dozens of identical norms)."""

    def prepare_swap(name: str, module: nn.Module, captures: dict) -> Swap | str | None:
        weight = next(module.parameters())
        x = torch.randn(2, 3, weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(weight)
        key = _settings(module)
        if key not in captures:
            captures[key] = _one_op_forward(module, x, pattern)
        forward = captures[key]
        if not isinstance(forward, OneOpForward):
            return forward
        parameter_dtypes = tuple((n, p.dtype) for n, p in module.named_parameters(recurse=False))
        call = OneOpCall(forward.record.op, forward.arguments, x.dtype, parameter_dtypes)
        problem = _check_fused_call(call, module, forward)
        if problem is not None:
            return problem
        found = forward.record
        record = MatchRecord(pattern, Where(name, found.where.location), found.op, found.mode, found.nodes)
        return Swap(module, (record,), call)

    return ModuleConverter(pattern, candidate, prepare_swap)


def _looks_like_a_norm(module: nn.Module) -> bool:
    """A leaf module whose only parameter is a 1-D floating `weight` (LayerNorm has a bias too)."""
    parameters = dict(module.named_parameters(recurse=False))
    return (not isinstance(module, FusedModule) and not list(module.children()) and list(parameters) == ["weight"]
            and parameters["weight"].dim() == 1 and parameters["weight"].is_floating_point())


RMS_NORM_CONVERTER = single_op_converter("rms_norm", _looks_like_a_norm)


def _prepare_moe_block(name: str, module: nn.Module, memo: dict) -> Swap | str:
    """A hand-written MoE block, checked by `match_moe_module` (outputs and gradients, eval and training)."""
    fused, found = match_moe_module(module)
    if fused is None:
        return found
    record = MatchRecord("moe", Where(name, source_line(module)), "fuser::moe_experts", found, ())
    return Swap(module, (record,), fused.fuser_call)


MOE_BLOCK_CONVERTER = ModuleConverter("moe", looks_like_moe_block, _prepare_moe_block)

MODULE_CONVERTERS: list[ModuleConverter] = [MOE_BLOCK_CONVERTER, RMS_NORM_CONVERTER]


def source_line(module: nn.Module) -> str:
    """Where the module's forward is written, `file:line`."""
    forward = inspect.unwrap(type(module).forward)
    try:
        return f"{inspect.getsourcefile(forward)}:{forward.__code__.co_firstlineno}"
    except TypeError:
        return "?"


def convert_modules(model: nn.Module, report: Report) -> list[Swap]:
    """The module-level converters' swaps, their near misses into `report`."""
    swaps = []
    memos: dict[int, dict] = {id(c): {} for c in MODULE_CONVERTERS}
    for name, module in model.named_modules():
        for converter in MODULE_CONVERTERS:
            if not converter.candidate(module):
                continue
            outcome = converter.prepare(name, module, memos[id(converter)])
            if isinstance(outcome, Swap):
                report.matches.extend(outcome.records)
                swaps.append(outcome)
                break
            if isinstance(outcome, str):
                report.near_misses.append(NearMiss(converter.pattern, Where(name, source_line(module)), outcome))
    return swaps
