"""Hand-written loop MoE blocks on `fuser::moe_experts` (and `fuser::moe_route` where it routes exactly).

A router `nn.Linear` and an `nn.ModuleList` of SwiGLU experts looped over in Python, as transformers 4.x
and most research code write them: `match_moe_module(block)` runs the block on random inputs with its
own weights, in eval and training mode, and checks that it computes the canonical top-k MoE (softmax
routing, top-k, optional renormalization, SwiGLU experts), its gradients included, before it returns a
fused copy (`fuser.modules.swap.fused_copy`); otherwise it says why not. `fuser.convert` installs the
checked plan (`MoEBlock`) on the block itself (`fuser.modules.swap.install`).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuser.kernels import moe as _kernel  # noqa: F401  (registers torch.ops.fuser.moe_*)
from fuser.kernels.moe.route import routing_tie_problem
from fuser.modules.swap import FusedModule, fused_copy
from fuser.numerics.contract import judge
from fuser.numerics.float64 import leaf64
from fuser.patterns.base import dtype_name
from fuser.patterns.strategies import FLOAT_DTYPES


@dataclass(frozen=True)
class MoEBlock:
    """What a hand-written MoE block computes, as `match_moe_module` found it by running it."""
    router: str                  # the router nn.Linear: a child of the block
    experts: str                 # the nn.ModuleList of experts: a child of the block
    gate: str                    # each expert's gate, up and down nn.Linear (their paths inside the expert)
    up: str
    down: str
    top_k: int
    renormalize: bool
    returns_router_logits: bool  # forward returns (output, router logits), as transformers 4.x's Mixtral block
    dtype: torch.dtype           # of the input and the parameters it was checked with

    def describe(self, num_experts: int) -> str:
        return (f"{num_experts} experts, top-{self.top_k}{', renormalized' if self.renormalize else ''}, SwiGLU, "
                f"{dtype_name(self.dtype)}, routed by "
                f"{'fuser::moe_route' if routing_tie_problem(self.top_k, num_experts) is None else 'torch.topk'}")

    def accepts(self, block: nn.Module, args: tuple, kwargs: dict) -> bool:
        """The calls the check covered: one positional [batch, length, hidden] input in the checked dtype, the
        weights still in it."""
        if len(args) != 1 or kwargs:
            return False
        (hidden_states,) = args
        router = getattr(block, self.router)
        gate = getattr(block, self.experts)[0].get_submodule(self.gate)
        return (isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3
                and hidden_states.dtype == self.dtype == router.weight.dtype == gate.weight.dtype
                and hidden_states.shape[-1] == router.in_features)

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict):
        (hidden_states,) = args
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = getattr(block, self.router)(x)
        weights, ids = softmax_top_k(router_logits, self.top_k, self.renormalize, x.dtype)
        out = torch.ops.fuser.moe_experts(x, ids, weights, *stacked_expert_weights(block, self))
        out = out.view(hidden_states.shape)
        return (out, router_logits) if self.returns_router_logits else out


def softmax_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype):
    """(weights in `dtype`, ids) of the canonical router: softmax over the experts in fp32, top-k, optional
    renormalization. `fuser::moe_route` where it chooses the experts torch.topk chooses (see
    `routing_tie_problem`), torch.topk elsewhere."""
    if routing_tie_problem(top_k, router_logits.shape[-1]) is None:
        return torch.ops.fuser.moe_route(router_logits, top_k, "softmax", renormalize, None, 1.0, dtype)
    weights, ids = torch.topk(router_logits.float().softmax(-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(dtype), ids


def stacked_expert_weights(block: nn.Module, plan: MoEBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [E, I, H], up [E, I, H], down [E, H, I]) from the experts' own nn.Linear weights.

    The kernel reads 3-D weights and separate nn.Linear weights are no view of one tensor, so they
    are stacked. Where a gradient is needed (or under torch.compile) that happens on every call
    (torch.stack passes the gradient back to each expert). Otherwise the stack is kept on the block
    until a weight changes: a different tensor (`data_ptr`) or an in-place write (`_version`, which
    optimizers and `load_state_dict` bump; a write through `weight.data` does not and is not seen).
    Measured (CPU, 64 experts): checking costs about 0.1 ms a call, where stacking copies every
    expert weight each call (36 ms for hidden 512 / intermediate 256 in fp32 on a CPU core; an
    OLMoE-sized block, hidden 2048 / intermediate 1024, is 805 MB in bf16, about 0.5 ms at an H100's
    3 TB/s, as long as the fused experts themselves). The price is memory: one more copy of the
    experts' weights per converted block, for as long as the block lives."""
    experts = getattr(block, plan.experts)
    weights = [_weights_of(experts, name) for name in (plan.gate, plan.up, plan.down)]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(w.requires_grad for w in weights[0])):
        return tuple(torch.stack(role) for role in weights)
    key = tuple((w.data_ptr(), w._version) for role in weights for w in role)
    cached = block.__dict__.get("_fuser_stacked")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, tuple(torch.stack(role) for role in weights))
        block.__dict__["_fuser_stacked"] = cached
    return cached[1]


def _weights_of(experts: nn.ModuleList, path: str) -> list[torch.Tensor]:
    """Each expert's `<path>.weight`, read from the module dicts: every call does this for every expert,
    and nn.Module's attribute lookup costs ten times as much (250 µs for 64 experts on a CPU core)."""
    names = path.split(".")
    weights = []
    for module in experts._modules.values():
        for name in names:
            module = module._modules[name]
        weights.append(module._parameters["weight"])
    return weights


# --- what the block computes ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Weights:
    """A block's weights in float64, as leaves (for the reference's gradients)."""
    router: torch.Tensor
    router_bias: torch.Tensor | None
    gates: tuple[torch.Tensor, ...]
    ups: tuple[torch.Tensor, ...]
    downs: tuple[torch.Tensor, ...]

    def router_leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.router, self.router_bias) if t is not None]

    def expert_leaves(self) -> list[torch.Tensor]:
        return [*self.gates, *self.ups, *self.downs]


def _weights64(router: nn.Linear, experts: nn.ModuleList, roles: tuple[str, str, str]) -> _Weights:
    gates, ups, downs = ([leaf64(e.get_submodule(name).weight, True) for e in experts] for name in roles)
    return _Weights(leaf64(router.weight, True), None if router.bias is None else leaf64(router.bias, True),
                    tuple(gates), tuple(ups), tuple(downs))


def _expert_outputs(x: torch.Tensor, w: _Weights) -> torch.Tensor:
    """Every SwiGLU expert on every token, [E, T, H] (a few tokens: the check's inputs)."""
    return torch.stack([(F.silu(x @ g.T) * (x @ u.T)) @ d.T for g, u, d in zip(w.gates, w.ups, w.downs)])


def _mixture(x: torch.Tensor, w: _Weights, expert_outputs: torch.Tensor, choice_logits: torch.Tensor, top_k: int,
             renormalize: bool) -> torch.Tensor:
    """The canonical top-k MoE of [T, H] tokens in float64. The experts are those with the best scores
    by `choice_logits`, the block's own router output, so that both sides choose the same experts."""
    ids = choice_logits.double().softmax(-1).topk(top_k, dim=-1).indices
    weights = F.linear(x, w.router, w.router_bias).softmax(-1).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    chosen = expert_outputs[ids, torch.arange(x.shape[0], device=x.device)[:, None]]  # [T, K, H]
    return (weights[..., None] * chosen).sum(1)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu (tanh)": functools.partial(F.gelu, approximate="tanh"),
                "relu": F.relu}


def _expert_roles(expert: nn.Module, x: torch.Tensor) -> tuple[tuple[str, str, str], str] | str:
    """((gate, up, down) paths, activation name) of a SwiGLU-like expert, found by running it on `x`;
    or why it is no such expert."""
    linears = {name: m for name, m in expert.named_modules() if isinstance(m, nn.Linear)}
    if len(linears) != 3:
        return f"its experts have {len(linears)} nn.Linear layer(s), not three (gate, up, down)"
    if any(m.bias is not None for m in linears.values()):
        return "its experts' linear layers have bias terms"
    hidden = x.shape[-1]
    with torch.no_grad():
        y = expert(x)
    x64 = x.double()
    for gate, up, down in itertools.permutations(linears, 3):
        g, u, d = (linears[n].weight.detach().double() for n in (gate, up, down))
        if g.shape != u.shape or g.shape[1] != hidden or d.shape != (hidden, g.shape[0]):
            continue
        for name, activation in _ACTIVATIONS.items():
            if judge(y, (activation(x64 @ g.T) * (x64 @ u.T)) @ d.T).problem is None:
                return (gate, up, down), name
    return "its experts do not compute down(act(gate(x)) · up(x)) from their three linear layers"


def _moe_children(block: nn.Module) -> tuple[str, str] | None:
    """(router, experts): the one nn.Linear child with an output per expert of the one nn.ModuleList child."""
    linears = [name for name, child in block.named_children() if isinstance(child, nn.Linear)]
    lists = [name for name, child in block.named_children() if isinstance(child, nn.ModuleList)]
    if len(linears) != 1 or len(lists) != 1:
        return None
    router, experts = getattr(block, linears[0]), getattr(block, lists[0])
    return (linears[0], lists[0]) if len(experts) >= 1 and router.out_features == len(experts) else None


def looks_like_moe_block(module: nn.Module) -> bool:
    """Cheap test for `fuser.convert`: a router nn.Linear child with one output per expert of an
    nn.ModuleList child (whether it is a MoE block is `match_moe_module`'s to find out)."""
    return not isinstance(module, FusedModule) and _moe_children(module) is not None


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool):
    """`module.train(training)` for a while; every submodule's own mode comes back after."""
    saved = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, mode in saved.items():
            m.training = mode


def _split_output(output: Any, router_logits: torch.Tensor) -> tuple[torch.Tensor, bool] | str:
    """(the MoE output, whether the router logits come with it), or what the forward returned instead."""
    if isinstance(output, torch.Tensor):
        return output, False
    if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output) \
            and output[1].shape == router_logits.shape and torch.equal(output[1].detach(), router_logits):
        return output[0], True
    return f"its forward returns {type(output).__name__}, not the output (or the output and the router logits)"


class _Mismatch(Exception):
    """The block does not compute the canonical MoE: the message says how."""


def _run(block: nn.Module, x: torch.Tensor) -> Any:
    try:
        return block(x)
    except Exception as error:
        raise _Mismatch(f"its forward raised {type(error).__name__} on a random input of shape {list(x.shape)}: "
                        f"{error}") from error


def _find_routing(block: nn.Module, router: nn.Linear, w: _Weights, x: torch.Tensor) -> tuple[int, bool, bool]:
    """(top_k, renormalize, returns router logits) for which the canonical MoE gives the block's output on `x`."""
    with torch.no_grad(), _mode(block, False):
        tokens = x.reshape(-1, x.shape[-1])
        choice = router(tokens)
        split = _split_output(_run(block, x), choice)
        if isinstance(split, str):
            raise _Mismatch(split)
        out, returns_logits = split
        x64 = tokens.double()
        experts = _expert_outputs(x64, w)
        candidates = {(top_k, renormalize): _mixture(x64, w, experts, choice, top_k, renormalize)
                      for top_k, renormalize in itertools.product(range(1, len(w.gates) + 1), (False, True))}
    out = out.reshape(tokens.shape)
    verdicts = {choice: judge(out, ref) for choice, ref in candidates.items()}
    for (top_k, renormalize), verdict in verdicts.items():
        if verdict.problem is None:
            return top_k, renormalize, returns_logits
    (top_k, renormalize), verdict = min(verdicts.items(), key=lambda item: item[1].error)
    raise _Mismatch(f"its output is no softmax top-k mixture of its SwiGLU experts (the closest, top-{top_k}"
                    f"{' renormalized' if renormalize else ''}: {verdict.problem})")


def _check_canonical(block: nn.Module, plan: MoEBlock, router: nn.Linear, w: _Weights, x: torch.Tensor,
                     training: bool) -> None:
    """The block's output and gradients (input, router, experts) on `x` against the canonical MoE in float64."""
    mode = "training" if training else "eval"
    x = x.detach().requires_grad_()
    router_params = [p for p in (router.weight, router.bias) if p is not None]
    expert_params = [e.get_submodule(n).weight for n in (plan.gate, plan.up, plan.down)
                     for e in getattr(block, plan.experts)]
    with torch.enable_grad(), _mode(block, training):
        tokens = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            choice = router(tokens)
        split = _split_output(_run(block, x), choice)
        if isinstance(split, str):
            raise _Mismatch(f"in {mode} mode, {split}")
        out = split[0].reshape(tokens.shape)
        x64 = tokens.detach().double().requires_grad_()
        ref = _mixture(x64, w, _expert_outputs(x64, w), choice, plan.top_k, plan.renormalize)
        problem = judge(out, ref).problem  # the block's own output: what it computes, not a rewrite
        if problem is not None:
            raise _Mismatch(f"in {mode} mode, on a random input of shape {list(x.shape)}: {problem}")
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
        got = torch.autograd.grad(out, [x, *router_params, *expert_params], grad.to(out.dtype), allow_unused=True)
        want = torch.autograd.grad(ref, [x64, *w.router_leaves(), *w.expert_leaves()], grad, allow_unused=True)
    split_at = (1, 1 + len(router_params))
    for what, part in (("input", slice(0, split_at[0])), ("router weights", slice(*split_at)),
                       ("expert weights", slice(split_at[1], None))):
        params = [x, *router_params, *expert_params][part]
        problem = judge(_flat(got[part], params), _flat(want[part], params)).problem
        if problem is not None:
            raise _Mismatch(f"in {mode} mode, the gradient of the {what} is not the canonical MoE's: {problem}")


def _flat(grads, params) -> torch.Tensor:
    """Gradients of several tensors as one vector in their dtype (zeros where a tensor got none)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().flatten() for g, p in zip(grads, params)])


def _check_fused(fused: nn.Module, block: nn.Module, plan: MoEBlock, router: nn.Linear, w: _Weights,
                 x: torch.Tensor) -> None:
    """The fused copy's output on `x` against the canonical MoE in float64 (the block's own output there: the
    original's own precision)."""
    with torch.no_grad(), _mode(fused, False), _mode(block, False):
        tokens = x.reshape(-1, x.shape[-1])
        out, own = (o[0] if plan.returns_router_logits else o for o in (fused(x), block(x)))
        x64 = tokens.double()
        ref = _mixture(x64, w, _expert_outputs(x64, w), router(tokens), plan.top_k, plan.renormalize)
        problem = judge(out.reshape(tokens.shape), ref, own=own.reshape(tokens.shape)).problem
    if problem is not None:
        raise _Mismatch(f"the fused op on a random input of shape {list(x.shape)}: {problem}; kept the original")


def match_moe_module(block: nn.Module) -> tuple[nn.Module | None, str]:
    """(a fused copy of `block`, what it runs) when the block computes the canonical top-k MoE, else
    (None, why not). The copy holds the block's own parameters and submodules (state_dict keys and
    tensors unchanged) and is an instance of a subclass of the block's class; the block is left as it was."""
    if isinstance(block, FusedModule):
        return None, "it is fused already"
    children = _moe_children(block)
    if children is None:
        return None, "no router nn.Linear child with one output per expert of an nn.ModuleList child"
    router_name, experts_name = children
    router, experts = getattr(block, router_name), getattr(block, experts_name)
    others = [n for n, _ in block.named_parameters() if n.split(".")[0] not in children]
    if others:
        return None, (f"it has parameters besides its router and experts ({', '.join(others[:3])}"
                      f"{', ...' if len(others) > 3 else ''}): its output is more than the routed experts'")
    dtypes = {p.dtype for p in block.parameters()}
    if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
        return None, (f"its parameters are in {' and '.join(sorted(map(dtype_name, dtypes)))}; the kernels take one "
                      "of float16, bfloat16, float32")
    (dtype,) = dtypes
    device = router.weight.device
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    hidden = router.in_features
    with _mode(block, False):
        found = _expert_roles(experts[0], random(5, hidden))
        if isinstance(found, str):
            return None, found
        roles, activation = found
        if activation != "silu":
            return None, (f"its experts compute down({activation}(gate(x)) · up(x)); the kernel fuses SiLU "
                          "(SwiGLU) only")
        for i, expert in enumerate(experts):
            if _expert_roles(expert, random(5, hidden)) != found:
                return None, f"expert {i} is not the SwiGLU expert 0 is (its layers are named or computed otherwise)"
    w = _weights64(router, experts, roles)
    inputs = [random(1, 1, hidden), random(2, 3, hidden)]
    try:
        top_k, renormalize, returns_logits = _find_routing(block, router, w, inputs[1])
        plan = MoEBlock(router_name, experts_name, *roles, top_k, renormalize, returns_logits, dtype)
        for x, training in itertools.product(inputs, (False, True)):
            _check_canonical(block, plan, router, w, x, training)
        fused = fused_copy(block, plan)
        _check_fused(fused, block, plan, router, w, inputs[1])  # the wiring: which weights are gate, up and down
    except _Mismatch as mismatch:
        return None, str(mismatch)
    return fused, plan.describe(len(experts))
