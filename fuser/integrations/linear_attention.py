"""transformers' gated delta net layers (Qwen3-Next, Qwen3.5, Olmo-hybrid, ...) on `fuser::gated_delta_rule`.

transformers' seam for these layers is the kernel functions their forward calls by name,
`torch_chunk_gated_delta_rule` (prefill) and `torch_recurrent_gated_delta_rule` (cached decode):
module functions wrapped by `use_kernel_func_from_hub_with_fallback` and listed on the layer class by
`use_kernelized_func` so that a kernel may take their place. Where the `kernels` package is installed (transformers
5.25 requires it) each name holds a `kernels` function module instead of a plain wrapper; the checks read the
plain-torch code behind either (`torch_fallback`). `convert_linear_attention` gives each layer
a subclass of its class whose forward is the same code with those two names bound to fuser's functions
(transformers' source and module globals are left as they are; other instances are untouched; a hub kernel that
`kernelize` chose for those functions gives way to fuser's in a converted layer). A layer
switches after its real calls, recorded on random hidden states (a prefill, a chunked prefill continuing
from the cache, a cached decode step), agree with transformers' own functions run in float64; a layer
whose calls pass an argument the fused functions do not implement stays as it was, a near miss naming it.
At run time a call with such an argument still runs transformers' function.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fuser.engine.capture import capture
from fuser.integrations.transformers import torch_fallback
from fuser.kernels.gated_delta import LIMITS
from fuser.numerics.contract import numerics_error, numerics_problem, run_nodes, tolerance
from fuser.report import MatchRecord, NearMiss, Report, Where

PATTERN = "linear_attention"
OP = "fuser::gated_delta_rule"
CHUNK, RECURRENT = "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"
IMPLEMENTED = {"query", "key", "value", "g", "beta", "chunk_size", "initial_state", "output_final_state",
               "use_qk_l2norm_in_kernel"}  # chunk_size changes no result: the kernels choose their own
# what transformers' wrapper reads besides the function's own parameters (packed sequences: it raises
# without flash-linear-attention); anything else reaches the function's **kwargs, which ignores it
WRAPPER_ARGUMENTS = ("cu_seqlens", "seq_idx")


@dataclass(frozen=True)
class Parameters:
    """How one of transformers' gated delta functions takes its arguments, read once (calls bind them with
    plain dict operations, which Dynamo traces without graph breaks, unlike inspect's binding)."""
    names: tuple[str, ...]           # positional-or-keyword, in order
    defaults: tuple[tuple[str, Any], ...]
    result_changing: frozenset[str]  # its named parameters and what the wrapper reads

    @staticmethod
    def of(original: Callable) -> "Parameters":
        """Raises TypeError where the plain-torch function cannot be found or lacks a parameter the fused call
        reads."""
        function = torch_fallback(original)
        parameters = [p for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]
        absent = sorted(IMPLEMENTED - {"chunk_size"} - {p.name for p in parameters})
        if absent:
            raise TypeError(f"{function.__name__} takes no {', '.join(absent)}")
        return Parameters(tuple(p.name for p in parameters),
                          tuple((p.name, p.default) for p in parameters if p.default is not p.empty),
                          frozenset(p.name for p in parameters) | frozenset(WRAPPER_ARGUMENTS))

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, those that reach the function's **kwargs among them."""
        return {**dict(self.defaults), **dict(zip(self.names, args)), **kwargs}

    def unimplemented(self, arguments: dict[str, Any]) -> list[str]:
        """The arguments of a call that change its result and that `fuser::gated_delta_rule` does not implement."""
        names = [name for name, value in arguments.items()
                 if name in self.result_changing and name not in IMPLEMENTED and value is not None]
        g, key, value = arguments["g"], arguments["key"], arguments["value"]
        if isinstance(g, torch.Tensor) and g.dim() != 3:
            names.append(f"g of shape {list(g.shape)} (a decay per key channel)")
        if max(key.shape[-1], value.shape[-1]) > LIMITS.max_head_dim:
            names.append(f"head dims {key.shape[-1]}/{value.shape[-1]} (at most {LIMITS.max_head_dim})")
        return names


def fused_call(arguments: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' (core_attn_out, last_recurrent_state) from the fused op."""
    query = arguments["query"]
    out, final = torch.ops.fuser.gated_delta_rule(
        query, arguments["key"], arguments["value"], arguments["g"], arguments["beta"], arguments["initial_state"],
        query.shape[-1] ** -0.5, bool(arguments["use_qk_l2norm_in_kernel"]))
    return out, (final if arguments["output_final_state"] else None)


def fused_function(original: Callable) -> Callable:
    """`original` (one of transformers' gated delta functions) computed by the fused op, where it implements
    the call's arguments; other calls run `original`."""
    parameters = Parameters.of(original)

    @functools.wraps(original)
    def function(*args, **kwargs):
        arguments = parameters.bind(args, kwargs)
        return original(*args, **kwargs) if parameters.unimplemented(arguments) else fused_call(arguments)
    function.fuser_original = original
    return function


# ---------------------------------------------------------------------------------------------
# The layer's forward with its kernel functions rebound
# ---------------------------------------------------------------------------------------------

def kernel_function_names(cls: type) -> list[str]:
    """The gated delta functions the class's forward calls by name (empty: not such a layer)."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return [name for name in (CHUNK, RECURRENT) if code is not None and name in code.co_names]


def dispatches_linear_attention(module: nn.Module) -> bool:
    """A transformers gated delta net layer, not yet converted."""
    return len(kernel_function_names(type(module))) == 2 and not isinstance(module, RebindsKernelFunctions)


def rebound(function: Callable, names: dict[str, Any]) -> Callable:
    """A copy of `function` whose code finds `names` among its globals. Decorators made with functools.wraps
    (the inner function in a closure cell) are copied down to the code that reads the names."""
    inner = getattr(function, "__wrapped__", None)
    cells = function.__closure__ or ()
    holds_inner = [inner is not None and _cell_holds(cell, inner) for cell in cells]
    if any(holds_inner):
        inner_copy = rebound(inner, names)
        cells = tuple(types.CellType(inner_copy) if held else cell for cell, held in zip(cells, holds_inner))
        namespace = function.__globals__
    else:
        inner_copy, namespace = None, _module_namespace(function.__globals__, names)
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, cells or None)
    copy.__kwdefaults__ = function.__kwdefaults__
    functools.update_wrapper(copy, function)
    if inner_copy is not None:
        copy.__wrapped__ = inner_copy
    return copy


_rebindings = itertools.count()


def _module_namespace(module_globals: dict, names: dict[str, Any]) -> dict:
    """A copy of a module's globals with `names` bound, as the namespace of a module of its own in sys.modules
    (named under this one): Dynamo finds a function's globals by its module's name, so a bare dict claiming
    transformers' module name would have its guards read transformers' module instead."""
    module = types.ModuleType(f"{__name__}.rebound_{next(_rebindings)}")
    module.__dict__.update({**module_globals, **names, "__name__": module.__name__})
    sys.modules[module.__name__] = module
    return module.__dict__


def _cell_holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


class RebindsKernelFunctions:
    """Mixed into a converted layer's class; pickles (and deep-copies) as the original class, converted again
    when loaded."""

    def __reduce_ex__(self, protocol):
        return _rebuild, (type(self).__mro__[2],), self.__getstate__()


def _rebuild(cls: type) -> nn.Module:
    module = cls.__new__(cls)
    module.__class__ = fused_layer_class(cls)
    return module


@functools.cache
def fused_layer_class(cls: type) -> type:
    """`Fused<cls>`: `cls` with its forward's gated delta functions bound to the fused ones."""
    forward = cls.forward
    names = {name: fused_function(inspect.unwrap(forward).__globals__[name]) for name in kernel_function_names(cls)}
    return type(f"Fused{cls.__name__}", (RebindsKernelFunctions, cls),
                {"forward": rebound(forward, names), "__module__": __name__})


# ---------------------------------------------------------------------------------------------
# The check: the layer's real calls against transformers' functions in float64
# ---------------------------------------------------------------------------------------------

def recorded_calls(model: nn.Module, layer: nn.Module, lengths=(20, 3, 1)) -> list[tuple[str, dict[str, Any]]]:
    """(function name, bound arguments) of every gated delta call `layer` makes on random hidden states of
    `lengths` tokens, fed one after the other through one cache: a prefill, a chunked prefill continuing from
    the cache, a decode step (each with the layer's conv and recurrent states). The prefill's 20 tokens take
    the op's chunkwise kernels, the others its recurrent kernel."""
    from transformers import DynamicCache

    calls = []
    forward_globals = inspect.unwrap(type(layer).forward).__globals__

    def recorder(name: str) -> Callable:
        original = forward_globals[name]
        parameters = Parameters.of(original)

        def record(*args, **kwargs):
            arguments = parameters.bind(args, kwargs)
            calls.append((name, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}))
            return original(*args, **kwargs)
        return record
    forward = rebound(type(layer).forward, {name: recorder(name) for name in kernel_function_names(type(layer))})
    parameter = next(layer.parameters())
    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for length in lengths:
            hidden = torch.randn(2, length, model.config.hidden_size, generator=generator)
            forward(layer, hidden.to(parameter), cache=cache)
    return calls


def _signature(arguments: dict[str, Any]) -> tuple:
    return tuple((k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v)
                 for k, v in arguments.items())


@functools.lru_cache(maxsize=64)
def _float64_graph(original: Callable, signature: tuple, arguments: "_Arguments"):
    """(nodes, the argument each placeholder reads) of Dynamo's graph of `original`'s function on arguments of
    this signature, its outputs packed into one tuple node (the layers of a model share a few)."""
    (gm, example_inputs), = capture(torch_fallback(original), (), arguments.values, fullgraph=True)
    by_identity = {id(v): k for k, v in arguments.values.items() if isinstance(v, torch.Tensor)}
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.call_function(tuple, (list(output.args[0]),))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    reads = [by_identity.get(id(example)) for example in example_inputs]
    if None in reads:
        raise ValueError("the captured graph reads a tensor that is none of the call's arguments")
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")], tuple(zip(placeholders, reads))


class _Arguments:
    """A call's arguments, hashed by their signature only (for `_float64_graph`'s cache)."""

    def __init__(self, values: dict[str, Any]):
        self.values, self.signature = values, _signature(values)

    def __hash__(self):
        return hash(self.signature)

    def __eq__(self, other):
        return self.signature == other.signature


def original_in_float64(original: Callable, arguments: dict[str, Any]):
    """transformers' function on `arguments` with every floating value and cast in float64 (it computes in
    float32 itself): Dynamo's graph of it, run by the numerics contract's float64 evaluator."""
    wrapped = _Arguments(arguments)
    nodes, reads = _float64_graph(original, wrapped.signature, wrapped)
    return run_nodes(nodes, {placeholder: arguments[name] for placeholder, name in reads}, float64=True)


def call_problem(name: str, original: Callable, arguments: dict[str, Any]) -> str | None:
    """None when the fused op computes this call as transformers' function does (float64 reference); the
    dtype's tolerance, or twice transformers' own error in float32 where that is larger."""
    with torch.no_grad():
        ours = fused_call(arguments)
        theirs = original(**arguments)
    reference = original_in_float64(original, arguments)
    tol = tolerance(arguments["query"].dtype)
    for what, mine, own, exact in zip(("the output", "the final state"), ours, theirs, reference):
        if (mine is None) != (exact is None):
            return f"{what}: {'none' if mine is None else 'one'} where transformers' {name} gives the other"
        if mine is not None:
            problem = numerics_problem(mine, exact, max(tol, 2 * numerics_error(own, exact)))
            if problem is not None:
                return f"{what}: {problem}"
    return None


def layer_problem(model: nn.Module, layer: nn.Module) -> str | None:
    """Why `layer` cannot switch to the fused functions, or None."""
    forward_globals = inspect.unwrap(type(layer).forward).__globals__
    try:
        parameters = {name: Parameters.of(forward_globals[name]) for name in kernel_function_names(type(layer))}
    except TypeError as error:
        return f"its gated delta functions are not as fuser knows them ({error}); kept the original"
    try:
        calls = recorded_calls(model, layer)
    except Exception as error:  # a layer this recipe cannot drive is left as it is
        return f"its forward could not be run on random hidden states with a cache ({type(error).__name__}: {error})"
    for name, arguments in calls:
        missing = parameters[name].unimplemented(arguments)
        if missing:
            return f"its {name} call passes {', '.join(missing)}, which {OP} does not implement; kept the original"
        problem = call_problem(name, forward_globals[name], arguments)
        if problem is not None:
            tokens = arguments["query"].shape[1]
            return f"its {name} call ({tokens} tokens): {problem}; kept the original"
    return None


def _source_line(layer: nn.Module) -> str:
    forward = inspect.unwrap(type(layer).forward)
    return f"{inspect.getsourcefile(forward)}:{forward.__code__.co_firstlineno}"


def convert_linear_attention(model: nn.Module, report: Report, dry_run: bool = False) -> None:
    """Switch each gated delta net layer of `model` whose calls pass the check (`layer_problem`) to the fused
    functions (unless `dry_run`), recording a match or a near miss per layer in `report`."""
    for name, layer in model.named_modules():
        if not dispatches_linear_attention(layer):
            continue
        site = Where(name, _source_line(layer))
        problem = layer_problem(model, layer)
        if problem is not None:
            report.near_misses.append(NearMiss(PATTERN, site, problem))
            continue
        report.matches.append(MatchRecord(PATTERN, site, OP, "through the layer's gated delta functions", ()))
        if not dry_run:
            layer.__class__ = fused_layer_class(type(layer))
