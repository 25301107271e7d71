"""`fuser.convert(model)`: the same model object, running the fused kernels without torch.compile.

- Modules, by the module-level matchers (`MODULE_CONVERTERS`), which need no example inputs:
  a module whose whole forward the backend's patterns turn into one fused op (an RMSNorm into
  `fuser::rms_norm`) is captured by Dynamo on a small random input, checked on random inputs of
  other shapes against its own code run in float64 (its gradients too when it trains or its
  parameters require grad), and only then switched to a subclass of its class whose forward
  calls the op: the same parameters (state_dict keys and tensors unchanged), `isinstance` still
  true. Hand-written MoE blocks go through `fuser.modules.experts.match_moe_module` the same way.
- MoE experts, in transformers models, likewise through transformers' `ExpertsInterface`: after each
  experts module's check against its own code in float64 (`fuser.modules.experts.fused_experts_problem`),
  the model's experts implementation becomes `"fuser"`.
- Attention, in transformers models: their attention layers call whatever the model's
  `config._attn_implementation` names in transformers' `AttentionInterface`; convert registers
  `"fuser"` there (and in `AttentionMaskInterface`, so masks come as SDPA's boolean masks or
  none at all for plain causal attention) and sets the model's implementation to it.
- Any other module, by rewriting its graph (`fuser.modules.module_graphs`), when convert is given example
  inputs (`convert(model, *args, **kwargs)`, a call of the model): one calibration run records each
  module's arguments, and the smallest modules whose forward holds a pattern are captured, rewritten
  by the backend's rewriter, checked as a whole in float64 (gradients included) and switched to
  their rewritten graph for calls like the recorded one.

`convert(model, dry_run=True)` makes every check and returns the report without changing anything.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from fuser.options import Options
from fuser.engine.capture import capture
from fuser.modules.experts import (EXPERTS_IMPLEMENTATION, FusedMoEBlock, dispatches_experts, fused_experts_problem,
                           looks_like_moe_block, match_moe_module, register_experts_implementation, swap_in_place)
from fuser.modules.module_graphs import rewrite_modules
from fuser.report import MatchRecord, NearMiss, Report, Where
from fuser.engine.rewriter import canonical_copy, rewrite
from fuser.numerics.contract import Run, gradient_problems, judge
from fuser.numerics.float64 import leaf64, run_nodes

ATTENTION_IMPLEMENTATION = "fuser"
WITHOUT_EXAMPLES = ("no example inputs, so only norms, MoE blocks and transformers' attention were tried; "
                    "fuser.convert(model, *args, **kwargs) with a call of the model rewrites other modules' "
                    "graphs too (hand-written attention, say)")
log = logging.getLogger("fuser.convert")


@dataclass(frozen=True)
class Swap:
    """A checked conversion of one module, applied only when `convert` is not a dry run."""
    module: nn.Module
    records: tuple[MatchRecord, ...]
    apply: Callable[[], None]


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
class FusedCall:
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


class FusedModule(nn.Module):
    """Mixed into a converted module's class: its forward runs `fuser_call` (a `FusedCall`, or a rewritten
    graph: a `module_graphs.ModuleGraph`) for the calls that was checked for, its own code for any other."""
    fuser_call: Any

    def forward(self, *args, **kwargs):
        if self.fuser_call.accepts(self, args, kwargs):
            return self.fuser_call(self, args, kwargs)
        return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickle (and deepcopy) as the original class, converted again when loaded."""
        return _rebuild_fused, (type(self).__mro__[2],), self.__getstate__()


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """`Fused<cls>`: a subclass of `cls` whose forward calls the fused op."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedModule, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def _rebuild_fused(cls: type) -> nn.Module:
    module = cls.__new__(cls)
    module.__class__ = fused_class(cls)
    return module


def install(module: nn.Module, call: Any) -> None:
    """Make `module` run `call` (see `FusedModule`): the same object, its class now `Fused<class>`."""
    module.__class__ = fused_class(type(module))
    module.fuser_call = call


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
    arguments: tuple[tuple, ...]     # of the op, as `FusedCall.arguments`
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


def _check_fused_call(call: FusedCall, module: nn.Module, forward: OneOpForward) -> str | None:
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
        call = FusedCall(forward.record.op, forward.arguments, x.dtype, parameter_dtypes)
        problem = _check_fused_call(call, module, forward)
        if problem is not None:
            return problem
        found = forward.record
        record = MatchRecord(pattern, Where(name, found.where.location), found.op, found.mode, found.nodes)
        return Swap(module, (record,), lambda: install(module, call))

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
    record = MatchRecord("moe", Where(name, _source_line(module)), "fuser::moe_experts", found, ())
    return Swap(module, (record,), lambda: swap_in_place(module, fused))


MOE_BLOCK_CONVERTER = ModuleConverter("moe", looks_like_moe_block, _prepare_moe_block)

MODULE_CONVERTERS: list[ModuleConverter] = [MOE_BLOCK_CONVERTER, RMS_NORM_CONVERTER]


# ---------------------------------------------------------------------------------------------
# Attention through transformers' attention interface
# ---------------------------------------------------------------------------------------------

def fuser_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, softcap: float | None = None, **kwargs: Any):
    """transformers' attention interface on `fuser::attention`: q, k, v are [batch, heads, length,
    head_dim] (fewer k/v heads for GQA, read as they are); returns ([batch, length, heads, head_dim], None).

    The mask is SDPA's (True = attend) or None; None means causal for a causal layer, as in SDPA.
    What the kernel does not cover (position biases, attention sinks, float64) runs through SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "sinks"))
    if unsupported or query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, softcap=softcap, **kwargs)
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if causal and key.shape[2] > q_length:  # an empty static cache: SDPA reads the first q_length keys too
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # SDPA's semantics: a bool mask's fully masked rows give zeros, a float mask is added to the scores
    masking = "add" if attention_mask is not None and attention_mask.dtype.is_floating_point else "sdpa"
    out = torch.ops.fuser.attention(query, key, value, attention_mask, float(scale), causal, 0, False,
                                    float(softcap or 0.0), float(dropout), float("-inf"), masking)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `"fuser"` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, fuser_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


def _dispatches_attention(module: nn.Module) -> bool:
    """A transformers attention layer: its forward looks its function up in ALL_ATTENTION_FUNCTIONS."""
    forward = inspect.unwrap(type(module).forward)  # the code under its decorators
    return "ALL_ATTENTION_FUNCTIONS" in getattr(getattr(forward, "__code__", None), "co_names", ())


def _source_line(module: nn.Module) -> str:
    forward = inspect.unwrap(type(module).forward)
    try:
        return f"{inspect.getsourcefile(forward)}:{forward.__code__.co_firstlineno}"
    except TypeError:
        return "?"


def _switch_implementation(report: Report, dry_run: bool, layers: list[tuple[str, nn.Module]],
                           problems: dict[str, str | None], pattern: str, op: str, interface: str,
                           switch: Callable[[], None]) -> None:
    """Record the layers a model-wide implementation switch covers and switch when none has a problem: one
    implementation serves the whole model, so one layer's problem keeps every layer as it is."""
    blocked = next((f"{name}: {problem}" for name, problem in problems.items() if problem), None)
    for name, layer in layers:
        site = Where(name, _source_line(layer))
        problem = problems[name] or (f"another {pattern} layer of the model cannot switch ({blocked})" if blocked else None)
        if problem is not None:
            report.near_misses.append(NearMiss(pattern, site, problem))
        else:
            report.matches.append(MatchRecord(pattern, site, op, f"through transformers' {interface}", ()))
    if blocked is None and not dry_run:
        switch()


def _convert_attention(model: nn.Module, report: Report, dry_run: bool) -> None:
    layers = [(name, m) for name, m in model.named_modules() if _dispatches_attention(m)]
    if not layers or not hasattr(getattr(model, "config", None), "_attn_implementation"):
        return
    problem = None if hasattr(torch.ops.fuser, "attention") else "the fuser::attention op is not available"
    if problem is None and not hasattr(model, "set_attn_implementation"):
        problem = "the model cannot change its attention implementation (no set_attn_implementation)"

    def switch() -> None:
        register_attention()
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    _switch_implementation(report, dry_run, layers, dict.fromkeys((name for name, _ in layers), problem),
                           "attention", "fuser::attention", "AttentionInterface", switch)


def _convert_experts(model: nn.Module, report: Report, dry_run: bool) -> None:
    """transformers' MoE experts (`use_experts_implementation`) switch to the "fuser" experts implementation
    when every experts module passes `fused_experts_problem`."""
    layers = [(name, m) for name, m in model.named_modules() if dispatches_experts(m)]
    if not layers:
        return
    problems = {name: fused_experts_problem(m) for name, m in layers}
    if not any(problems.values()) and not hasattr(model, "set_experts_implementation"):
        problems = dict.fromkeys(problems, "the model cannot change its experts implementation "
                                           "(no set_experts_implementation)")

    def switch() -> None:
        register_experts_implementation()
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    _switch_implementation(report, dry_run, layers, problems, "moe", "fuser::moe_experts", "ExpertsInterface",
                           switch)


# ---------------------------------------------------------------------------------------------

def _convert_modules(model: nn.Module, report: Report) -> list[Swap]:
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
                report.near_misses.append(NearMiss(converter.pattern, Where(name, _source_line(module)), outcome))
    return swaps


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(f"{module}.") or not module


def _rewrite_module_graphs(model: nn.Module, args: tuple, kwargs: dict, report: Report, swaps: list[Swap]) -> None:
    """Graph rewriting of the modules no other converter handles (see `fuser.modules.module_graphs`). Where it has
    its own word on a module a module-level converter turned down (a norm whose forward does more than
    the norm, say), that replaces the converter's near miss."""
    handled = {swap.module for swap in swaps} | {m for m in model.modules() if _dispatches_attention(m) or dispatches_experts(m)
                                                 or isinstance(m, (FusedModule, FusedMoEBlock))}
    rewritten, found = rewrite_modules(model, args, kwargs, handled)
    sites = [r.where.module for r in (*found.matches, *found.near_misses)]
    report.near_misses = [n for n in report.near_misses if not any(_within(site, n.where.module) for site in sites)]
    report.extend(found)
    swaps += [Swap(r.module, tuple(r.report.matches), lambda r=r: install(r.module, r.graph)) for r in rewritten]


def convert(model: nn.Module, *example_args: Any, dry_run: bool = False, **example_kwargs: Any) -> nn.Module | Report:
    """Switch `model` (in place) to fuser's kernels and return it; with `dry_run`, change nothing and
    return the report of what would be converted and what would not, and why.

    Example inputs, a call of the model (`model(*example_args, **example_kwargs)`), let convert rewrite
    the graphs of the modules no module-level converter handles (see `fuser.modules.module_graphs`); without
    them only norms, MoE blocks and transformers' attention are converted, and the report says so."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuser.convert takes a torch.nn.Module, not {type(model).__name__}; "
                        "for a function use torch.compile(fn, backend='fuser')")
    report = Report()
    swaps = _convert_modules(model, report)
    if example_args or example_kwargs:
        _rewrite_module_graphs(model, example_args, example_kwargs, report, swaps)
    else:
        report.notes.append(WITHOUT_EXAMPLES)
    _convert_attention(model, report, dry_run)
    _convert_experts(model, report, dry_run)
    if dry_run:
        return report
    for swap in swaps:
        swap.apply()
    log.info("%s", report)
    return model
