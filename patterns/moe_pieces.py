"""The pieces MoE experts code is made of, as structural pieces of search functions (`patterns/base.py`): the
grouped GEMMs with their in-place biases, transformers 5.17's sentinel masking, the gate's activation, and the
gatings the experts kernel fuses (GATINGS: SwiGLU, GPT-OSS's clamped SwiGLU on interleaved or concatenated
gate/up columns). Shared by the grouped_mm experts and the dense (Llama-4) experts of `patterns/moe.py`.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from fuser.patterns.base import UNCHECKED, structural
from fuser.patterns.nodes import op_name, written


def _sentinel_masked_shapes(node):
    """transformers ≤ 5.17 zeroes expert-parallel sentinel rows after each grouped GEMM:
    `out.masked_fill((expert_ids_g >= E).unsqueeze(-1), 0.0)`; later versions only do so
    under expert parallelism. Either way, ids come from a top-k over E experts (see check)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "masked_fill" \
            and len(node.args) == 3 and node.args[2] == 0:
        sentinel = node.args[1]
        if isinstance(sentinel, fx.Node) and sentinel.target == "unsqueeze" and sentinel.args[1:] == (-1,):
            above = sentinel.args[0]
            if isinstance(above, fx.Node) and getattr(above.target, "__name__", above.target) == "ge":
                yield node.args[0], (above.args[0], above.args[1]), (node, sentinel, above)
    yield node, (UNCHECKED, UNCHECKED), ()


@structural(_sentinel_masked_shapes)
def sentinel_masked(x, expert_ids, num_experts):
    return x.masked_fill((expert_ids >= num_experts).unsqueeze(-1), 0.0)


GROUPED_MM_NAMES = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def _bias_added(node):
    """(bias, ids, covered nodes) of the one in-place write into a grouped GEMM's output, `out.add_(bias[ids])`
    (transformers' `_grouped_linear`); (None, UNCHECKED, ()) otherwise: any other write then joins the match
    unmodeled, and the pattern's check names it."""
    writes = [user for user in node.users if node in written(user)]
    write = writes[0] if len(writes) == 1 else None
    selected = write.args[1] if write is not None and len(write.args) == 2 else None
    if op_name(write) != "add_" or write.kwargs or write.args[0] is not node or not (
            isinstance(selected, fx.Node) and selected.target is operator.getitem
            and all(isinstance(a, fx.Node) for a in selected.args)):
        return None, UNCHECKED, ()
    return selected.args[0], selected.args[1], (write, *((selected,) if len(selected.users) == 1 else ()))


def _grouped_linear_shapes(node):
    """A grouped GEMM in any spelling (`torch._grouped_mm`, `F.grouped_mm`, transformers' fallback op), its
    weight B [E, K, N] as the GEMM takes it, and the per-expert bias transformers adds in place or none."""
    if isinstance(node, fx.Node) and node.op == "call_function" and len(node.args) == 2 \
            and getattr(node.target, "__name__", None) in GROUPED_MM_NAMES and "offs" in node.kwargs \
            and all(node.kwargs.get(k) is None for k in ("bias", "out_dtype")):
        bias, ids, covered = _bias_added(node)
        yield node.args[0], (node.args[1], node.kwargs["offs"], bias, ids), (node, *covered)


@structural(_grouped_linear_shapes)
def grouped_linear(x, weight, offs, bias, expert_ids):
    """Rows [offs[g-1], offs[g]) of x times weight[g] (B [E, K, N]), plus bias[expert_ids] in place where a bias
    is given; run eagerly through transformers' op, which takes every dtype (the native kernel takes bf16 only).
    `experts_arguments` registers the op: an import inside code Dynamo traces fails where nothing imported it."""
    out = torch.ops.transformers.grouped_mm_fallback(x, weight, offs=offs)
    if bias is not None:
        out.add_(bias[expert_ids])
    return out


def _function_name(node) -> str:
    """`silu`, `gelu(approximate='tanh')`: a call's function and its literal arguments."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    literals = [repr(a) for a in node.args[1:]] + [f"{k}={v!r}" for k, v in node.kwargs.items()]
    return f"{name}({', '.join(literals)})" if literals else name


def _activation_shapes(node):
    """Any function of the gate projection alone (its literal arguments aside): SiLU or another
    activation, named so that check can say which."""
    if isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.args \
            and isinstance(node.args[0], fx.Node) \
            and not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        yield node.args[0], (_function_name(node),), (node,)


@structural(_activation_shapes)
def gate_activation(gate, name):
    """The activation of the gate projection; the kernel fuses SiLU (`name` "silu") only."""
    return {"silu": F.silu}[name](gate)


# --- the gated activations: (name, how gate and up come out of the gate_up projection, the function) -----------

def _swiglu(gate, up, g):
    """act(gate) * up: SwiGLU where act is SiLU (`g` binds the activation's name)."""
    return gate_activation(gate, g["activation"]) * up


def _clamped_swiglu(gate, up, g):
    """GPT-OSS's `_apply_gate`: limit and lower (= -limit, a literal of its own in the graph) and alpha bind."""
    gate = gate.clamp(min=None, max=g["limit"])
    up = up.clamp(min=g["lower"], max=g["limit"])
    return (up + 1) * (gate * torch.sigmoid(gate * g["alpha"]))


def _concatenated(gate_up):
    halves = gate_up.chunk(2, dim=-1)
    return halves[0], halves[1]


def _interleaved(gate_up):
    return gate_up[..., ::2], gate_up[..., 1::2]


GATINGS = {  # the spellings of the experts' gating the `moe` pattern has a row for: (activation, layout, split, glu)
    "swiglu": ("silu", "concatenated", _concatenated, _swiglu),
    "clamped swiglu, interleaved": ("clamped_swiglu", "interleaved", _interleaved, _clamped_swiglu),
    "clamped swiglu": ("clamped_swiglu", "concatenated", _concatenated, _clamped_swiglu),
}
