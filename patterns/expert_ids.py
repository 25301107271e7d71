"""MoE routers read as pieces of their own, apart from the experts they feed.

The experts' kernel needs one fact from the router: every expert id names an expert (lies in [0, E)), since
`fuser::moe_experts` drops ids outside it where the original code would index out of range, or, as
transformers' expert-parallel path, give those rows zero. `ids_problem` proves it from the ids' producers,
whatever the router computes its weights with: the indices of a top-k, max or argmax over the experts (the
routers of OLMoE, Mixtral, Qwen, DeepSeek-V3, GPT-OSS's top-k then softmax, Llama-4's sigmoid top-1, PhiMoE's
sparse mixer), concatenations of such along the choices, through views and integer casts, never written after
they are made. An unusual router therefore leaves the experts fused and stays as it is, feeding them.
`router_name` says which router feeds the experts, for reports and near misses.

Llama-4's router hands its experts dense scores [T, E] instead: sigmoid of the top-k logits scattered into -inf,
so that every expert not chosen has a score of exactly 0. `scattered_top_k` reads that, giving the ids the scores
are nonzero at.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from fuser.patterns.nodes import op_name, shares_storage_with, tensor_meta, writers

# ops that pass ids through unchanged in value (views, integer casts)
_PASS_THROUGH = {"view", "reshape", "long", "int", "contiguous", "unsqueeze", "squeeze", "flatten", "clone"}
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16)


# ops whose outputs (a tuple: values and indices) are fresh tensors, sharing no storage with each other
_FRESH_TUPLES = {"topk", "sort", "max", "min", "aminmax"}


def _fresh_output(node: fx.Node) -> bool:
    """`node` is one output of a tuple-valued fresh op (`topk(...)[1]`): it shares no storage with the others."""
    return node.target is operator.getitem and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int) \
        and op_name(node.args[0]) in _FRESH_TUPLES


def _aliases(node: fx.Node) -> set[fx.Node]:
    """`nodes.alias_class`, except that the outputs of a tuple-valued fresh op are apart (the alias class takes
    `getitem` as sharing its input's storage, and would join topk's indices to its values, which routers
    renormalize in place)."""
    seen, frontier = {node}, [node]
    while frontier:
        current = frontier.pop()
        bases = () if _fresh_output(current) else shares_storage_with(current)
        views = (u for u in current.users if current in shares_storage_with(u) and not _fresh_output(u))
        for other in (*bases, *views):
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return seen


def _argument(node: fx.Node, position: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def _over_last_dim(node: fx.Node, scores: object, experts: int, dim_position: int) -> bool:
    """The reduction `node` (top-k, max, argmax) runs over the last dim of `scores`, which has `experts` entries."""
    meta = tensor_meta(scores)
    dim = _argument(node, dim_position, "dim", -1 if op_name(node) == "topk" else None)
    return isinstance(meta, torch.Tensor) and meta.dim() >= 1 and meta.shape[-1] == experts \
        and dim in (-1, meta.dim() - 1)


def _index_source(node: fx.Node, experts: int) -> str | None:
    """Why the indices `node` gives do not provably name experts, or None: `topk(s, k, dim)[1]`,
    `s.max(dim)[1]` and `s.argmax(dim)` over the experts' dim."""
    name = op_name(node)
    if name == "argmax":
        return None if _over_last_dim(node, node.args[0], experts, 1) else "an argmax over another dim"
    if node.target is operator.getitem and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if op_name(source) == "topk" and _over_last_dim(source, source.args[0], experts, 2):
            return None
        if op_name(source) == "max" and _argument(source, 1, "dim") is not None \
                and _over_last_dim(source, source.args[0], experts, 1):
            return None
    return f"{name or node.op}({node.name})"


def ids_problem(node: object, experts: int, inside: frozenset = frozenset()) -> str | None:
    """Why the expert ids `node` are not provably in [0, experts), or None (module docstring). Writes by nodes
    `inside` (the match reading the ids, whose own writes its check models) are not counted."""
    if not isinstance(node, fx.Node):
        return "the expert ids are not a tensor of the graph"
    meta = tensor_meta(node)
    if not isinstance(meta, torch.Tensor) or meta.dtype not in _INTEGER_DTYPES:
        return "the expert ids are not an integer tensor"
    if writers(_aliases(node)) - inside:
        return f"the expert ids ({node.name}) are written in place after they are made"
    name = op_name(node)
    if name in _PASS_THROUGH or (name == "to" and len(node.args) == 2 and node.args[1] in _INTEGER_DTYPES
                                 and not node.kwargs):
        return ids_problem(node.args[0], experts, inside)
    if name in ("cat", "concat", "concatenate"):
        parts, dim = _argument(node, 0, "tensors"), _argument(node, 1, "dim", 0)
        if dim not in (-1, meta.dim() - 1) or not isinstance(parts, (list, tuple)):
            return f"the expert ids are a concatenation along dim {dim}, not along the choices"
        return next((p for p in (ids_problem(part, experts, inside) for part in parts) if p), None)
    source = _index_source(node, experts)
    if source is None:
        return None
    return (f"the expert ids come from {source}, not from a top-k, max or argmax over the {experts} experts: they "
            "may name no expert (an expert-parallel sentinel, say), which the kernel drops and the original indexes")


def router_name(ids: object) -> str:
    """Which router made these expert ids, in words (for reports): the op that chose them."""
    while isinstance(ids, fx.Node) and (op_name(ids) in _PASS_THROUGH or op_name(ids) == "to"):
        ids = ids.args[0]
    if not isinstance(ids, fx.Node):
        return "an unknown router"
    if op_name(ids) in ("cat", "concat", "concatenate"):
        return "a sparse-mixer router (one choice per max)"
    if ids.target is operator.getitem and isinstance(ids.args[0], fx.Node):
        return {"topk": "a top-k router", "max": "a max router"}.get(op_name(ids.args[0]), "an unknown router")
    return "an argmax router" if op_name(ids) == "argmax" else "an unknown router"


def _cast_or_sigmoid(node):
    """The input of a cast (`.to(dtype)`, `.float()`) or a sigmoid; None for anything else."""
    name = op_name(node)
    if name in ("to", "float") and len(node.args) <= 2 and not node.kwargs:
        return node.args[0]
    if name == "sigmoid" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def scattered_top_k(scores: object, experts: int, inside: frozenset = frozenset()
                    ) -> tuple[fx.Node, None] | tuple[None, str]:
    """(the ids [T, k] of Llama-4's router, None) where `scores` [T, E] is
    `sigmoid(full_like(logits, -inf).scatter_(1, ids, values))` (casts aside) for `values, ids = topk(logits, k,
    dim=1)`: 0 off the chosen experts, the sigmoid of their logits at them. Else (None, why not)."""
    chain, node, sigmoids = [], scores, 0
    while isinstance(node, fx.Node) and _cast_or_sigmoid(node) is not None:
        sigmoids += op_name(node) == "sigmoid"
        chain.append(node)
        node = _cast_or_sigmoid(node)
    not_it = (None, "the routing scores are not the sigmoid of top-k logits scattered into -inf (Llama-4's router): "
                    "the dense experts would run every expert on every token")
    if sigmoids != 1 or op_name(node) != "scatter_" or len(node.args) != 4 or node.kwargs:
        return not_it
    base, dim, ids, values = node.args
    top = values.args[0] if isinstance(values, fx.Node) and values.target is operator.getitem \
        and values.args[1] == 0 else None
    if op_name(base) != "full_like" or base.args[1:] != (float("-inf"),) or base.kwargs \
            or not isinstance(ids, fx.Node) or ids.target is not operator.getitem or ids.args != (top, 1) \
            or op_name(top) != "topk" or top.args[0] is not base.args[0] or dim not in (1, -1):
        return not_it
    if writers(_aliases(base)) - inside != {node} or any(writers({n}) - inside for n in chain):
        return None, "the routing scores are written in place after they are made"
    problem = ids_problem(ids, experts, inside)
    return (None, problem) if problem else (ids, None)
