"""FX graphs as networkx graphs, built only when a picture or a caller asks for one."""
from __future__ import annotations

import re


def graph_to_networkx(graph, prefix: str = ""):
    """An FX graph as a networkx.DiGraph. Node attributes: op, target, args (its literal arguments,
    e.g. "float32" for a cast, "-1, True" for a mean), shape (ints; a symbolic size as its name,
    e.g. "s0"), dtype, match (the id of the match that covers or replaced it, or None)."""
    import networkx as nx

    from fuser.patterns.nodes import tensor_meta

    out = nx.DiGraph()
    for node in graph.nodes:
        meta = tensor_meta(node)
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "_qualified_op_name", getattr(node.target, "__name__", str(node.target)))
        out.add_node(prefix + node.name, op=node.op, target=str(target), args=_literal_args(node),
                     shape=tuple(d if isinstance(d, int) else str(d) for d in meta.shape) if meta is not None else None,
                     dtype=str(meta.dtype).replace("torch.", "") if meta is not None else None,
                     match=node.meta.get("fuser_match"))
        for source in node.all_input_nodes:
            out.add_edge(prefix + source.name, prefix + node.name)
    return out


def _literal_args(node) -> str:
    """The arguments of a node that are not other nodes (nor None), as short text ("" for placeholders)."""
    from torch import fx

    def has_node(arg) -> bool:
        return isinstance(arg, fx.Node) or (isinstance(arg, (list, tuple)) and any(map(has_node, arg)))

    def show(arg) -> str:
        if isinstance(arg, float):
            return f"{arg:g}"
        if isinstance(arg, (list, tuple)):
            return "(" + ", ".join(map(show, arg)) + ")"
        return str(arg).replace("torch.", "")

    if node.op not in ("call_function", "call_method"):
        return ""
    names = _parameter_names(node.target)  # an op's literals by name (`eps=1e-06`): its schema has them
    if names:
        return ", ".join(f"{name}={show(a)}" for name, a in [*zip(names, node.args), *node.kwargs.items()]
                         if a is not None and not has_node(a))
    literals = [show(a) for a in node.args if a is not None and not has_node(a)]
    literals += [f"{k}={show(v)}" for k, v in node.kwargs.items() if v is not None and not has_node(v)]
    return ", ".join(literals)


def readable_input_name(target: str) -> str:
    """A placeholder's target as its source names it:
    `L_args_0_modules_model_modules_layers_modules_0_modules_norm_parameters_weight_` → `model.layers.0.norm.weight`;
    a positional argument of a captured call (`L_args_0_`, see `fuser.engine.capture`) → `args_0`."""
    name = re.sub(r"^[Ll]_(self_|target_|args_\d+_(?=.)|kwargs_)?", "", target).rstrip("_")  # target_: engine.capture
    name = re.sub(r"^modules_", "", name)
    return re.sub(r"_(modules|parameters|buffers)_", ".", name)


def _parameter_names(target) -> list[str]:
    """The parameter names of a torch op (`torch.ops.fuser.rms_norm`), from its schema; [] for anything else."""
    import torch
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None)
    schema = getattr(target, "_schema", None) if isinstance(target, torch._ops.OpOverload) else None
    return [argument.name for argument in schema.arguments] if schema is not None else []
