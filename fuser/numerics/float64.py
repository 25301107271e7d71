"""The one way to run original code in float64, the reference every door holds a rewrite to.

Every floating value becomes float64 (casts to a lower precision become casts to float64), so
the reference measures the rewrite's error, not the original's. Also: the recorded values of a
graph's nodes on real inputs, and random inputs like real ones for the checks that draw their own.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx


def to64(x: Any) -> Any:
    """A floating tensor in float64 (still part of its autograd graph), a floating dtype as float64, else `x`."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, torch.dtype) and x.is_floating_point:
        return torch.float64
    return x


def leaf64(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """A float64 copy of `t` cut from its graph: a leaf of the reference, requiring grad when asked."""
    return to64(t.detach()).requires_grad_(requires_grad)


def grouped_mm_float64(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch._grouped_mm` as plain matmuls, for float64 (the grouped kernels take 16/32-bit floats
    only). Groups end at `offs`: rows of a 2-D `a` against a 3-D `b`, columns of a 2-D `b` against a
    3-D `a`, the shared dim when both are 2-D (one output per group); 3-D with 3-D is a batch."""
    if offs is None:
        out = a @ b
    else:
        starts = [0, *offs[:-1].tolist()]
        spans = [slice(start, end) for start, end in zip(starts, offs.tolist())]
        if a.dim() == 2 and b.dim() == 3:
            out = torch.cat([a[span] @ b[g] for g, span in enumerate(spans)])
        elif a.dim() == 3 and b.dim() == 2:
            out = torch.cat([a[g] @ b[:, span] for g, span in enumerate(spans)], dim=1)
        else:
            out = torch.stack([a[:, span] @ b[span] for span in spans])
    return out if bias is None else out + bias


_GROUPED_MM = {torch._grouped_mm, torch.ops.aten._grouped_mm.default, getattr(F, "grouped_mm", torch._grouped_mm)}


def run_nodes(nodes: list[fx.Node], inputs: dict[fx.Node, Any], float64: bool = False,
              results: Sequence[fx.Node] | None = None) -> Any:
    """Evaluate `nodes` (in graph order) from `inputs`: as written, or with all floating math in float64.
    The last node's value, or the values of `results` after the last node (a buffer the nodes write into)."""
    cast = to64 if float64 else (lambda x: x)
    env = {node: cast(v) for node, v in inputs.items()}
    kept = {nodes[-1], *(results or ())}
    last_reader = {i: node for node in nodes for i in node.all_input_nodes}  # values dropped once read (a chain's states)
    for node in nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        args, kwargs = fx.node.map_aggregate((args, kwargs), cast)
        if node.op == "call_function" and float64 and node.target in _GROUPED_MM:
            env[node] = grouped_mm_float64(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {node.op} node {node.name}")
        for i in node.all_input_nodes:
            if last_reader[i] is node and i not in kept:
                env.pop(i, None)
    return env[nodes[-1]] if results is None else tuple(env[node] for node in results)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = result = super().run_node(n)
        return result


def capture_values(gm: fx.GraphModule, inputs: list) -> dict[fx.Node, Any]:
    """Every node's value on real inputs (cloned: the graph may modify its inputs in place)."""
    cloned = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*cloned)
    return recorder.values


def random_like(real: torch.Tensor, generator: torch.Generator, shape: list[int] | None = None) -> torch.Tensor:
    """New values in the range the real tensor has, of its shape or `shape`: token ids stay token ids, a
    boolean mask a random mask; floats at its scale (root mean square of its finite values, 1 where that
    is 0 or there are none), drawn in float64 and rounded to its dtype."""
    shape = list(real.shape) if shape is None else shape
    if real.dtype == torch.bool:
        return (torch.rand(shape, generator=generator) < 0.5).to(real.device)
    if real.is_floating_point():
        finite = real.detach()[real.detach().isfinite()].double()
        scale = finite.pow(2).mean().sqrt().item() if finite.numel() else 1.0
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(real.dtype).to(real.device)
    low, high = (int(real.min()), int(real.max())) if real.numel() else (0, 1)
    return torch.randint(low, high + 1, shape, generator=generator, dtype=real.dtype).to(real.device)
