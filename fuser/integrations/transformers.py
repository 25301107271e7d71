"""Every seam into transformers; transformers itself is imported only where one is used.

- `register()` makes "fuser" an attention implementation (`AttentionInterface`; its masks are SDPA's,
  through `AttentionMaskInterface`) and an experts implementation (`ExpertsInterface`). `fuser.convert`
  calls it when it switches a model; who sets `attn_implementation="fuser"` or
  `experts_implementation="fuser"` without convert calls it first. `import fuser` registers nothing.
- `fuser_attention` runs `fuser::attention` for what it implements. An argument that changes the result
  and that it does not implement (attention sinks `s_aux`, a position bias...) is an error naming it,
  never a result that ignores it; `fuser.convert` sees these arguments first and keeps such a model's
  attention as it was.
- `fuser_experts_forward` runs `fuser::moe_experts` on transformers' 3-D expert weights and biases in place
  (stored transposed or not, gate and up rows concatenated or interleaved; SwiGLU or GPT-OSS's clamped SwiGLU);
  experts the kernel does not cover run transformers' `grouped_mm` experts, with a warning saying why.
- `torch_fallback` finds the plain-torch function behind one of transformers' kernel functions (the module
  functions a hub kernel may replace), whether a functools.wraps wrapper or, with the `kernels` package, a
  `kernels` function module.
- For `fuser.convert`: which modules dispatch to these interfaces, the arguments each attention layer
  passes in a run of the model (`attention_arguments`), the check of experts against their own code
  (`fused_experts_problem`), and the model-wide switches (`convert_attention`, `convert_experts`): one
  implementation serves a whole model, so one layer convert cannot take keeps every layer as it was.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fuser.kernels.moe import expert_arguments
from fuser.kernels.runtime import KERNEL_DTYPES
from fuser.modules.converters import source_line
from fuser.modules.module_graphs import buffers_kept
from fuser.numerics.contract import Run, gradient_problems, judge
from fuser.numerics.float64 import leaf64
from fuser.patterns.base import dtype_name
from fuser.report import MatchRecord, NearMiss, Report, Where

IMPLEMENTATION = "fuser"


def register() -> None:
    """Make "fuser" an attention and an experts implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, fuser_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    ExpertsInterface.register(IMPLEMENTATION, fuser_experts_forward)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned and not torch.compiler.is_compiling():  # Dynamo cannot trace a warning
        _warned.add(message)
        warnings.warn(message)


# ---------------------------------------------------------------------------------------------
# Kernel functions
# ---------------------------------------------------------------------------------------------

def torch_fallback(kernel_function: Callable) -> Callable:
    """The plain-torch function behind one of transformers' kernel functions (module functions decorated with
    `use_kernel_forward_from_hub` or `use_kernel_func_from_hub_with_fallback`, which a hub kernel may replace).

    Without the `kernels` package (transformers ≤ 5.24 does not require it) the decorators leave functools.wraps
    wrappers. With it (transformers 5.25 requires it) the name holds a `kernels` function module: an `nn.Module`
    instance, marked by its `kernel_layer_name`, whose class's forward calls the decorated function, its free
    variable `func`, unless a kernel was chosen for the calling layer. Raises TypeError saying what it found
    where neither holds."""
    name = getattr(kernel_function, "__name__", None) or getattr(kernel_function, "kernel_layer_name", "?")
    function = kernel_function
    if isinstance(function, nn.Module) and hasattr(function, "kernel_layer_name"):
        function = inspect.getclosurevars(type(function).forward).nonlocals.get("func")
        if not callable(function):
            raise TypeError(f"{name} is a kernels function module whose forward calls no `func` (a kernels "
                            "version fuser does not know), so its plain-torch function cannot be found")
    function = inspect.unwrap(function)
    if not inspect.isfunction(function):
        raise TypeError(f"{name} is not one of transformers' kernel functions: a {type(function).__name__}, "
                        "not a Python function, is behind it")
    return function


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

# keyword arguments of transformers' attention functions that `fuser_attention` implements
IMPLEMENTED = ("dropout", "scaling", "is_causal", "softcap", "s_aux")
# ... and those that do not change the result: the mask already holds the window (masks come from
# `sdpa_mask`), the cache is in the keys and values, the rest is for the caller
WITHOUT_EFFECT = ("sliding_window", "position_ids", "cache_position", "use_cache", "output_attentions",
                  "output_router_logits", "output_hidden_states", "return_dict", "layer_idx")
_MEANINGS = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "a position bias",
             "cu_seq_lens_q": "packed sequences", "cu_seq_lens_k": "packed sequences", "head_mask": "a head mask"}


def unimplemented_arguments(names: Iterable[str]) -> list[str]:
    """The argument names among `names` (those given a value) that change the result and `fuser_attention`
    does not implement; anything it does not know is taken to change the result."""
    return sorted(set(names) - set(IMPLEMENTED) - set(WITHOUT_EFFECT))


def _described(names: list[str]) -> str:
    return ", ".join(f"{n} ({_MEANINGS[n]})" if n in _MEANINGS else n for n in names)


def fuser_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, softcap: float | None = None, s_aux: torch.Tensor | None = None,
                    **kwargs: Any):
    """transformers' attention interface on `fuser::attention`: q, k, v are [batch, heads, length,
    head_dim] (fewer k/v heads for GQA, read as they are); returns ([batch, length, heads, head_dim], None).

    The mask is SDPA's (True = attend) or None; None means causal for a causal layer, as in SDPA. `s_aux` are
    gpt-oss's attention sinks (one logit per head in the softmax's denominator; a row that sees no key then
    gives zeros, as the eager code does). An argument it does not implement is an error (see
    `unimplemented_arguments`); dtypes the kernel does not take (float64) run SDPA, or with sinks the op's
    plain-torch path."""
    unimplemented = unimplemented_arguments(k for k, v in kwargs.items() if v is not None)
    if unimplemented:
        raise NotImplementedError(
            f"fuser attention: {type(module).__name__} passes {_described(unimplemented)}, which fuser::attention "
            "does not implement; use another attn_implementation for this model (fuser.convert keeps its own)")
    if query.dtype not in KERNEL_DTYPES and s_aux is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
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
    # SDPA's semantics: a bool mask's fully masked rows give zeros, a float mask is added to the scores; with
    # sinks such rows give zeros by the masked softmax itself
    if attention_mask is not None and attention_mask.dtype.is_floating_point:
        masking = "add"
    else:
        masking = "sdpa" if s_aux is None else "fill"
    out = torch.ops.fuser.attention(query, key, value, attention_mask, float(scale), causal, 0, False,
                                    float(softcap or 0.0), float(dropout), float("-inf"), masking, s_aux)
    return out.transpose(1, 2).contiguous(), None


def dispatches_attention(module: nn.Module) -> bool:
    """A transformers attention layer: its forward looks its function up in ALL_ATTENTION_FUNCTIONS."""
    forward = inspect.unwrap(type(module).forward)  # the code under its decorators
    return "ALL_ATTENTION_FUNCTIONS" in getattr(getattr(forward, "__code__", None), "co_names", ())


def _probe_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A call of the model: the one convert was given, else transformers' dummy token ids (all attended)."""
    if args or kwargs:
        return args, kwargs
    dummy = getattr(model, "dummy_inputs", None)
    if not isinstance(dummy, dict) or not isinstance(dummy.get("input_ids"), torch.Tensor):
        return None
    ids = dummy["input_ids"].to(next(model.parameters()).device)
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    return (), {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if takes_mask else {})}


def attention_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, set[str]] | str:
    """The keyword arguments (those given a value) each attention layer hands its attention function in one run
    of the model without gradients, on `_probe_call`; or why there was no such run. The model runs its own
    attention: the lookup of every attention function (`AttentionInterface.get_interface`) is wrapped for the
    run to record what each is given."""
    from transformers.modeling_utils import AttentionInterface

    call = _probe_call(model, args, kwargs)
    if call is None:
        return "no example inputs and no dummy inputs of transformers' to run the model on"
    seen: dict[nn.Module, set[str]] = {}
    lookup = AttentionInterface.get_interface

    def recording(interface, implementation: str, default: Callable) -> Callable:
        function = lookup(interface, implementation, default)

        def recorded(module: nn.Module, *positional: Any, **named: Any) -> Any:
            seen.setdefault(module, set()).update(k for k, v in named.items() if v is not None)
            return function(module, *positional, **named)
        return recorded

    AttentionInterface.get_interface = recording
    try:
        with torch.no_grad(), buffers_kept(model):
            model(*call[0], **call[1])
    except Exception as error:
        return f"the model raised {type(error).__name__} on {'the example' if args or kwargs else 'dummy'} inputs"
    finally:
        AttentionInterface.get_interface = lookup
    return seen


def _switch_implementation(report: Report, dry_run: bool, layers: list[tuple[str, nn.Module]],
                           problems: dict[str, str | None], pattern: str, op: str, interface: str,
                           switch: Callable[[], None]) -> None:
    """Record the layers a model-wide implementation switch covers and switch when none has a problem: one
    implementation serves the whole model, so one layer's problem keeps every layer as it is."""
    blocked = next((f"{name}: {problem}" for name, problem in problems.items() if problem), None)
    for name, layer in layers:
        site = Where(name, source_line(layer))
        problem = problems[name] or (f"another {pattern} layer of the model cannot switch ({blocked})" if blocked else None)
        if problem is not None:
            report.near_misses.append(NearMiss(pattern, site, problem))
        else:
            report.matches.append(MatchRecord(pattern, site, op, f"through transformers' {interface}", ()))
    if blocked is None and not dry_run:
        register()
        switch()


def convert_attention(model: nn.Module, report: Report, dry_run: bool, args: tuple, kwargs: dict) -> None:
    """transformers' attention layers switch to the "fuser" implementation when every one of them, in one run of the
    model (`attention_arguments`), passes only arguments it implements."""
    layers = [(name, m) for name, m in model.named_modules() if dispatches_attention(m)]
    if not layers or not hasattr(getattr(model, "config", None), "_attn_implementation"):
        return
    problem = None if hasattr(torch.ops.fuser, "attention") else "the fuser::attention op is not available"
    if problem is None and not hasattr(model, "set_attn_implementation"):
        problem = "the model cannot change its attention implementation (no set_attn_implementation)"
    problems = {name: problem for name, _ in layers}
    if problem is None:
        seen = attention_arguments(model, args, kwargs)
        kept = f"the model keeps its attention implementation ({model.config._attn_implementation!r})"
        for name, layer in layers:
            if isinstance(seen, str):
                problems[name] = (f"what its attention function is given was not seen ({seen}); {kept}: give "
                                  "convert a call of the model, convert(model, *args, **kwargs)")
            elif layer not in seen:
                problems[name] = f"it did not run in a call of the model, so what its attention is given is unknown; " \
                                 f"{kept}"
            elif unimplemented_arguments(seen[layer]):
                problems[name] = (f"its attention function is given {_described(unimplemented_arguments(seen[layer]))}"
                                  f", which fuser::attention does not implement; {kept}")
    _switch_implementation(report, dry_run, layers, problems, "attention", "fuser::attention", "AttentionInterface",
                           lambda: model.set_attn_implementation(IMPLEMENTATION))


# ---------------------------------------------------------------------------------------------
# MoE experts
# ---------------------------------------------------------------------------------------------

# (attribute `use_experts_implementation` sets, its value the kernel does not cover, why)
_UNSUPPORTED_LAYOUTS = (
    ("has_gate", False, "its experts are not gated (an up projection only)"),
    ("has_post_expert_norm", True, "a norm follows each expert"),
    ("_is_expert_parallel", True, "it runs expert-parallel (ids of other ranks' experts are sentinels)"),
)
# transformers experts whose `_apply_gate` is GPT-OSS's clamped SwiGLU (alpha and limit read off the module), and
# how it reads gate and up out of the gate_up projection: (module under transformers.models, class, layout)
_CLAMPED_SWIGLU_GATES = (("gpt_oss.modeling_gpt_oss", "GptOssExperts", "interleaved"),
                         ("openai_privacy_filter.modeling_openai_privacy_filter", "OpenAIPrivacyFilterExperts",
                          "concatenated"))


def _is_silu(activation: Any) -> bool:
    from transformers import activations
    return activation is F.silu or isinstance(activation, (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU)))


@functools.cache
def _clamped_swiglu_gates() -> dict[Callable, str]:
    """{the `_apply_gate` function: its gate/up layout} of `_CLAMPED_SWIGLU_GATES` this transformers has."""
    found = {}
    for module, name, layout in _CLAMPED_SWIGLU_GATES:
        try:
            found[getattr(importlib.import_module(f"transformers.models.{module}"), name)._apply_gate] = layout
        except (ImportError, AttributeError):
            continue
    return found


def _gating(experts: nn.Module) -> tuple[str, tuple] | str:
    """(gate/up layout "concatenated" or "interleaved", (activation, alpha, limit) of `fuser::moe_experts`) of
    transformers experts, or why the kernel does not compute their gating."""
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    if gate is _default_apply_gate:
        if not getattr(experts, "is_concatenated", True):
            return "its gate and up rows are interleaved"
        if not _is_silu(getattr(experts, "act_fn", None)):
            return f"its activation is {type(getattr(experts, 'act_fn', None)).__name__}, not SiLU"
        return "concatenated", ("silu", 1.0, 0.0)
    layout = _clamped_swiglu_gates().get(gate)
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if layout is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, limit)):
        return "it has its own gating (`_apply_gate`)"
    return layout, ("clamped_swiglu", float(alpha), float(limit))


def _experts_tensors(experts: nn.Module, layout: str, gating: tuple) -> tuple:
    """`fuser::moe_experts`'s expert arguments as views of the module's parameters (stored [E, 2I, H] / [E, H, I],
    or transposed)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # stored [E, H, 2I] and [E, I, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    biased = getattr(experts, "has_bias", False)
    return expert_arguments(gate_up, down, experts.gate_up_proj_bias if biased else None,
                            experts.down_proj_bias if biased else None, layout == "interleaved", gating)


def experts_call(experts: nn.Module, hidden_states: torch.Tensor) -> tuple | str:
    """The arguments of `fuser::moe_experts` after the routing that compute these transformers experts on
    `hidden_states` (their weights and biases read in place, their gating), or why the kernel cannot."""
    for attribute, unsupported, reason in _UNSUPPORTED_LAYOUTS:
        if getattr(experts, attribute, not unsupported) == unsupported:
            return reason
    gating = _gating(experts)
    if isinstance(gating, str):
        return gating
    call = _experts_tensors(experts, *gating)
    dtypes = sorted({dtype_name(t.dtype) for t in call[:6] if t is not None})
    if hidden_states.dtype not in KERNEL_DTYPES or dtypes != [dtype_name(hidden_states.dtype)]:
        return (f"hidden states in {dtype_name(hidden_states.dtype)}, expert weights in {' and '.join(dtypes)} "
                "(the kernel takes one of float16, bfloat16, float32 for both)")
    return call


def fuser_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface on `fuser::moe_experts`: hidden states [T, H], the router's
    top-k ids and weights [T, K]; the weights (`gate_up_proj` [E, 2I, H] or, transposed, [E, H, 2I]; `down_proj`)
    and biases are read in place. What the kernel does not cover runs `grouped_mm`."""
    call = experts_call(self, hidden_states)
    if isinstance(call, str):
        from transformers.integrations.moe import grouped_mm_experts_forward
        _warn_once(f"fuser experts: {type(self).__name__} runs transformers' grouped_mm experts: {call}")
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return torch.ops.fuser.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), *call)


def dispatches_experts(module: nn.Module) -> bool:
    """A transformers experts module: `use_experts_implementation` made its forward look its function
    up in an experts interface by `config._experts_implementation`."""
    forward = getattr(type(module), "forward", None)
    return "experts_interface" in getattr(getattr(forward, "__code__", None), "co_freevars", ())


def fused_experts_problem(experts: nn.Module) -> str | None:
    """Why the "fuser" experts implementation cannot stand in for these experts, or None: what the kernel
    does not cover, or a result (and, when they train or their weights require grad, gradients) off
    the experts' own code run in float64 on random tokens routed at random."""
    gate_up = experts.gate_up_proj
    generator = torch.Generator().manual_seed(0)
    tokens, num_experts = 7, gate_up.shape[0]
    hidden = gate_up.shape[1] if getattr(experts, "is_transposed", False) else gate_up.shape[2]
    x = torch.randn(tokens, hidden, generator=generator).to(gate_up)
    call = experts_call(experts, x)
    if isinstance(call, str):
        return call
    top_k = min(2, num_experts)
    ids = torch.rand(tokens, num_experts, generator=generator).argsort(-1)[:, :top_k].to(gate_up.device)
    routing = torch.rand(tokens, top_k, generator=generator).to(gate_up)
    own_forward = getattr(type(experts).forward, "__wrapped__", None)
    if own_forward is None:
        return "its own forward is not reachable (no __wrapped__ on the dispatching forward)"
    reference = copy.deepcopy(experts).double()
    gradients = experts.training or any(p.requires_grad for p in experts.parameters())
    ours_in, own_in = ([t.detach().clone().requires_grad_(gradients) for t in (x, routing)] for _ in range(2))
    ref_in = [leaf64(t, gradients) for t in (x, routing)]
    with torch.enable_grad() if gradients else torch.no_grad():
        got = fuser_experts_forward(experts, ours_in[0], ids, ours_in[1])
        own = own_forward(experts, own_in[0], ids, own_in[1])
        expected = own_forward(reference, ref_in[0], ids, ref_in[1])
        problem = judge(got, expected, own=own).problem
        problem = f"output: {problem}" if problem else None
        if problem is None and gradients:
            names = [n for n, _ in experts.named_parameters()]
            weights = [p for _, p in experts.named_parameters()]
            problems = gradient_problems(("the hidden states", "the routing weights", *names),
                                         Run([got], [*ours_in, *weights]), Run([own], [*own_in, *weights]),
                                         Run([expected], [*ref_in, *(p for _, p in reference.named_parameters())]),
                                         generator)
            problem = next((p for p in problems if p), None)
    return f"fuser's experts differ from the module's own code: {problem}" if problem else None


def convert_experts(model: nn.Module, report: Report, dry_run: bool) -> None:
    """transformers' MoE experts (`use_experts_implementation`) switch to the "fuser" experts implementation
    when every experts module passes `fused_experts_problem`."""
    layers = [(name, m) for name, m in model.named_modules() if dispatches_experts(m)]
    if not layers:
        return
    problems = {name: fused_experts_problem(m) for name, m in layers}
    if not any(problems.values()) and not hasattr(model, "set_experts_implementation"):
        problems = dict.fromkeys(problems, "the model cannot change its experts implementation "
                                           "(no set_experts_implementation)")
    _switch_implementation(report, dry_run, layers, problems, "moe", "fuser::moe_experts", "ExpertsInterface",
                           lambda: model.set_experts_implementation(IMPLEMENTATION))
