"""Numerical proof of a rewrite: the replacement against the original code run in float64.

The numerics contract (DESIGN.md): relative L2 error ‖out − ref‖/‖ref‖ within a tolerance
set by the output dtype, and NaN/±inf exactly where the original has them. The reference is
the original nodes evaluated with every floating value in float64 (casts to lower precision
become casts to float64), so it measures the replacement's error, not the original's.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}
TF32_TOLERANCE = 5e-4


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    return TF32_TOLERANCE if tf32 and dtype == torch.float32 else TOLERANCE.get(dtype, 2e-2)


def numerics_problem(out: torch.Tensor, ref: torch.Tensor, tol: float) -> str | None:
    """None if `out` meets the contract against the float64 `ref`, else what is wrong."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} where the original gives {tuple(ref.shape)}"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.equal(out.isnan(), ref.isnan()):
        return f"NaN at {int((out.isnan() != ref.isnan()).sum())} position(s) where the original differs"
    if not torch.equal(out.isinf(), ref.isinf()) or not torch.equal(out[out.isinf()], ref[ref.isinf()]):
        return "±inf where the original differs"
    finite = out.isfinite() & ref.isfinite()
    diff, base = (out - ref)[finite].norm(), ref[finite].norm()
    error = (diff / base).item() if base > 0 else diff.item()
    return None if error <= tol else f"relative L2 error {error:.2e} above the tolerance {tol:.0e}"


def numerics_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖/‖ref‖ over the positions finite on both sides (0 when ref is zero there)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = out.isfinite() & ref.isfinite()
    base = ref[finite].norm()
    return ((out - ref)[finite].norm() / base).item() if base > 0 else 0.0


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, torch.dtype) and x.is_floating_point:
        return torch.float64
    return x


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


def run_nodes(nodes: list[fx.Node], inputs: dict[fx.Node, Any], float64: bool = False) -> Any:
    """Evaluate `nodes` (in graph order) from `inputs`: as written, or with all floating math in float64."""
    cast = _to64 if float64 else (lambda x: x)
    env = {node: cast(v) for node, v in inputs.items()}
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
    return env[nodes[-1]]


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


def compare_site(m, values: dict[fx.Node, Any]) -> str | None:
    """Run a match's replacement and its original on the recorded values; None if they agree."""
    inside = set(m.nodes)
    inputs = {node: values[node] for n in m.nodes for node in n.all_input_nodes if node not in inside}
    expected = values.get(m.output)
    if not isinstance(expected, torch.Tensor):
        return None
    m.resolve = values.__getitem__
    try:
        with torch.no_grad():
            ours = m.pattern.replace(m)
    finally:
        m.resolve = None
    with torch.no_grad():
        ref = run_nodes(m.nodes, inputs, float64=True)
    # the dtype's tolerance, or twice the original's own error where the original misses it too
    # (an fp32 output that the code itself rounds through bf16, say)
    original_error = numerics_error(expected, ref)
    problem = numerics_problem(ours, ref, max(tolerance(expected.dtype), 2 * original_error))
    return f"verification failed: {problem}; kept the original" if problem else None
