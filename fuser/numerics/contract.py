"""The numerics contract: the one floor policy every door holds a result to against its float64 reference.

DESIGN.md: relative L2 error ‖out − ref‖/‖ref‖ within a tolerance set by the output dtype, and
NaN/±inf exactly where the original has them. The reference is the original code run in float64
(`fuser.numerics.float64`). `judge` is what every door calls, for outputs and gradients alike
(first-call verification, `fuser.fuzz`, `fuser.convert`'s module, experts and MoE-block checks,
the demo); each door passes the evidence it has, and the same evidence gives the same verdict:
- the dtype's tolerance: fp32 1e-5 (5e-4 with tf32 dots), fp16 5e-3, bf16 2e-2;
- or twice the error of the original code in its own precision, where even that misses it
  (ill-conditioned inputs: a one-element RMSNorm row, whose gradient is eps-sized);
- no bound on a gradient difference below what its precision resolves (`gradient_resolution`: a few roundings
  of the size the gradient has without cancellation; float64's for the reference);
- and, where the rewrite misses all that, the floor measured on inputs about an ulp away
  (`neighbour_floors`): the error of a result of a few elements that sums cancelling terms is one
  rounding's luck, and the original can be exact by chance where equally good code is not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx

from fuser.numerics.float64 import run_nodes

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}
TF32_TOLERANCE = 5e-4

# inputs about one ulp away from a check's, on which the original is measured again where a rewrite misses
# the tolerance (4 underestimated the original's spread: a one-element fp16 RMSNorm row whose dx the fp32
# original gets 25% wrong there and at least 32% wrong at one of 8 neighbours)
NEIGHBOURS = 8


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    return TF32_TOLERANCE if tf32 and dtype == torch.float32 else TOLERANCE.get(dtype, 2e-2)


def numerics_problem(out: torch.Tensor, ref: torch.Tensor, tol: float) -> str | None:
    """None if `out` meets the contract against the float64 `ref` within `tol`, else what is wrong."""
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


@dataclass(frozen=True)
class Verdict:
    """What `judge` found: the measured error, the bound it was held to, and what is wrong (None: nothing)."""
    error: float
    bound: float
    problem: str | None


def judge(out: torch.Tensor, ref: torch.Tensor, *, own: torch.Tensor | None = None, resolution: float = 0.0,
          attainable: Callable[[], float] | None = None) -> Verdict:
    """`out` against its float64 reference `ref`, by the one policy (see the module's docstring). A door passes:
    - `own`: the original code's own result in its own precision. None where the door has none, or where `out`
      is itself the original's (a check of what code computes: whether a block is the canonical MoE);
    - `resolution`: for a gradient, `gradient_resolution` of it (0 for outputs: float64 resolves them);
    - `attainable`: the floor measured on neighbouring inputs (see `neighbour_floors`), asked for only where
      the rewrite misses every other bound. None where the door cannot nudge its inputs: it does not know
      which of them are structural (router scores choose experts: nudged, they choose others).
    NaN and ±inf must stand where the reference has them whatever the bound."""
    bound = tolerance(out.dtype)
    if own is not None:
        bound = max(bound, 2 * numerics_error(own, ref))
    if resolution > 0 and out.shape == ref.shape and _finite_difference(out, ref) <= resolution:
        bound = math.inf
    problem = numerics_problem(out, ref, bound)
    if problem is not None and attainable is not None:
        bound = max(bound, attainable())
        problem = numerics_problem(out, ref, bound)
    return Verdict(numerics_error(out, ref) if out.shape == ref.shape else math.inf, bound, problem)


def _finite_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ over the positions finite in both."""
    out, ref = out.detach().double(), ref.detach().double()
    finite = out.isfinite() & ref.isfinite()
    return (out - ref)[finite].norm().item()


def _finite_norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(t.detach().double()[t.detach().isfinite()].norm().item() ** 2 for t in tensors))


def gradient_resolution(cotangents: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], wrt: torch.Tensor,
                        dtype: torch.dtype) -> float:
    """The absolute difference below which a gradient computed in `dtype` (of `outputs` along `cotangents`, with
    respect to `wrt`) cannot be told from its exact value: eight roundings (8 eps of `dtype`) of its natural size
    ‖cotangents‖·‖outputs‖/‖wrt‖, but at most half the dtype's tolerance of it, so that a gradient of that size
    is held to the tolerance as ever.
    A gradient far below that size comes out of cancelling terms, which every evaluation rounds at that size:
    float64's own (a float32 softmax row [46.2, -8.8] has dx ≈ ±2.3e-24, and float64 evaluation of the original
    gives [0, -2.3e-24], its y rounding to [1, 1.3e-24]), and float32 code's (a two-key attention row with
    p = [7e-4, 1 − 7e-4]: dq and dk are 0.7% and 1.2% of their natural sizes, dS = p(dP − Δ) cancels, and the
    kernel's are 3.4 and 5.7 eps of those sizes from float64's)."""
    size = _finite_norm([wrt])
    if size == 0.0:
        return 0.0
    roundings = min(8 * torch.finfo(dtype).eps, tolerance(dtype) / 2)
    return roundings * _finite_norm(cotangents) * _finite_norm(outputs) / size


def nudged(named: dict[str, torch.Tensor], constants: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """The tensors, each floating one not in `constants` moved by up to about one unit in its last place."""
    generator = torch.Generator().manual_seed(seed)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        shift = (torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1) * torch.finfo(t.dtype).eps
        return (t.detach().double() * (1 + shift.to(t.device))).to(t.dtype)

    return {name: nudge(t) if t.is_floating_point() and name not in constants else t for name, t in named.items()}


# seed -> per result: (its float64 reference, the original's result in its own precision) on the inputs
# `nudged` with that seed
Measure = Callable[[int], dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]]


def neighbour_floors(measure: Measure, want: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """Per result, the error no code in the original's precision can be held below near the checked inputs
    (whose float64 results are `want`): over NEIGHBOURS inputs about an ulp away, the worst of twice the
    original's own error and of how far the exact result moves. On an ill-conditioned result of a few
    elements (a one-element dX summing cancelling terms) one error is one rounding's luck."""
    floor: dict[str, float] = {}
    for seed in range(NEIGHBOURS):
        for key, (exact, written) in measure(seed).items():
            if exact is not None and written is not None and want.get(key) is not None:
                floor[key] = max(floor.get(key, 0.0), 2 * numerics_error(written, exact),
                                 numerics_error(exact, want[key]))
    return floor


@dataclass(frozen=True)
class Run:
    """One side of a gradient check: its outputs, and the tensors to differentiate them by (in the same
    order on every side)."""
    outputs: Sequence
    wrt: Sequence[torch.Tensor]


def gradient_problems(names: Sequence[str], fused: Run, own: Run | None, ref: Run,
                      generator: torch.Generator) -> list[str | None]:
    """For each `wrt` tensor (named by `names`), what `judge` finds wrong with its gradient in `fused` against
    `ref` (float64), or None; `own` is the original code in its own precision (None: see `judge`). The
    gradients are those of random cotangents of the floating outputs."""
    outputs = [i for i, out in enumerate(ref.outputs) if isinstance(out, torch.Tensor) and out.is_floating_point()
               and out.requires_grad and fused.outputs[i].requires_grad]
    if not outputs:
        return [None] * len(names)
    cotangents = [torch.randn(ref.outputs[i].shape, generator=generator, dtype=torch.float64) for i in outputs]

    def gradients(run: Run) -> list[torch.Tensor]:
        outs = [run.outputs[i] for i in outputs]
        grads = torch.autograd.grad(outs, run.wrt, [c.to(o.dtype).to(o.device) for c, o in zip(cotangents, outs)],
                                    allow_unused=True)
        return [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, run.wrt)]

    ref_outputs = [ref.outputs[i] for i in outputs]
    theirs = gradients(own) if own is not None else [None] * len(names)
    problems = []
    for name, got, own_grad, want, wrt in zip(names, gradients(fused), theirs, gradients(ref), ref.wrt):
        resolution = gradient_resolution(cotangents, ref_outputs, wrt, got.dtype)
        problem = judge(got, want, own=own_grad, resolution=resolution).problem
        problems.append(f"the gradient of {name}: {problem}" if problem else None)
    return problems


def compare_site(m, values: dict[fx.Node, object]) -> str | None:
    """First-call verification: a match's replacement against its original nodes in float64 on the recorded
    values, by `judge` with the original's own recorded result (no neighbours: see `judge`); None if right.
    A match with several results (a chain: its outputs and final state) is judged on each."""
    inside = set(m.nodes)
    inputs = {node: values[node] for n in m.nodes for node in n.all_input_nodes if node not in inside}
    expected = [values.get(node) for node in m.outputs]
    if not all(isinstance(e, torch.Tensor) for e in expected):
        return None
    m.resolve = values.__getitem__
    try:
        with torch.no_grad():
            ours = m.pattern.replace(m)
    finally:
        m.resolve = None
    with torch.no_grad():
        refs = run_nodes(m.nodes, inputs, float64=True, results=m.outputs)
    ours = ours if m.results is not None else (ours,)
    for node, mine, ref, own in zip(m.outputs, ours, refs, expected):
        problem = judge(*map(_whole, (mine, ref)), own=_whole(own)).problem
        if problem:
            which = f" ({node.name})" if m.results is not None else ""
            return f"verification failed{which}: {problem}; kept the original"
    return None


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (tensor parallelism) as the whole tensor it stands for (every rank verifies the same site at the
    same point, so the gather is collective); any other tensor as it is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(t, DTensor):
            return t.full_tensor()
    return t
