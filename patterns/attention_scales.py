"""Reading attention's scale factors: numbers, constants in tensors, symbolic scalars, learned tensors.

A factor on q, on k or on the scores (`scaled` in patterns/attention_pieces.py) is, in order of preference:
- a number: a Python literal, or a tensor whose value is one constant everywhere, read exactly by abstract
  evaluation of its producers (patterns/mask_reading.py: `torch.full([], 4.0, dtype=..., device=...)`,
  `torch.tensor(d).sqrt()`, every argument modeled, the dtype's rounding computed by torch itself, and no
  write into it before it is read); the kernel's scale is the product of the numbers;
- a symbolic scalar (a SymFloat node: `torch.compile(dynamic=True)` passes `self.scaling` as a graph
  input): multiplied into the op's scale in the graph, so the op gets the value at run time;
- any other tensor (a temperature, 0-d or per head [H, 1, 1]): folded into q (or k) outside the kernel,
  `q * t` or `q / t` as the code wrote it; a learned one gets its gradient through that product (`read_scale`
  says why that meets the contract). A scores factor folds into q only if it is the same for every key (its
  last dim is 1) and keeps the scores' shape and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fuser.patterns.mask_algebra import Pieces, Unknown
from fuser.patterns.mask_reading import MaskReader
from fuser.patterns.nodes import is_number, symbolic_scalar, tensor_meta

# (binding of the factor, binding of its inverse flag, the input it multiplies: "q", "k" or the scores)
FACTORS = (("q_scale", "q_inverse", "q"), ("k_scale", "k_inverse", "k"), ("scale", "inverse", "scores"))


@dataclass(frozen=True)
class Scale:
    """A site's scale: `number` (what the kernel multiplies by), `symbolic` ((binding, inverse) pairs the
    op's scale is multiplied or divided by at run time), `folded` ((binding, inverse, "q" or "k") tensors
    applied to q or k before the op), `problem` (why it cannot be, or None)."""
    number: float = 1.0
    symbolic: tuple = ()
    folded: tuple = ()
    problem: str | None = None


def constant_number(node: fx.Node, reader: fx.Node) -> float | None:
    """The one value a tensor holds everywhere when `reader` reads it, proved from its producers; None if
    it is not such a constant (or takes a gradient: a leaf made with requires_grad=True)."""
    meta = tensor_meta(node)
    if meta is None or meta.requires_grad or not (meta.dtype.is_floating_point or meta.dtype in (torch.int64,
                                                                                                   torch.int32)):
        return None
    reader_ = MaskReader(node.graph)
    try:
        v = reader_.at(node, reader_.position[reader])
    except Unknown:
        return None
    if isinstance(v, Pieces) and len(v.pieces) == 1 and is_number(v.pieces[0][1]):
        return float(v.pieces[0][1])
    return None


def _fits(factor: torch.Tensor, target: torch.Tensor, per_row: bool) -> str | None:
    """Why `target · factor` is not a factor of `target` alone (same shape and dtype; for the scores,
    the same for every key), or None."""
    try:
        shape = tuple(torch.broadcast_shapes(factor.shape, target.shape))
    except RuntimeError:
        shape = None
    if shape != tuple(target.shape) or (per_row and factor.dim() > 0 and factor.shape[-1] != 1):
        what = "is not 0-d or the same for every key" if per_row else "does not broadcast to it"
        return f"a scale tensor of shape {tuple(factor.shape)} on {'the scores' if per_row else 'q/k'} " \
               f"{tuple(target.shape)} {what}"
    if torch.promote_types(factor.dtype, target.dtype) != target.dtype and factor.dim() > 0:
        return f"a {factor.dtype} scale tensor changes the dtype of {target.dtype} scores"
    return None


def read_scale(m, metas: dict[str, torch.Tensor]) -> Scale:
    """The scale of a naive attention match (`metas`: example values of q, k and the scores). A folded tensor
    that takes a gradient gets it through `q * t`: Σ dq·q over the kernel's dq, a sum of terms that cancel
    (Σ_j dS_ij = 0 on every row), as the original's Σ dS·(q·kᵀ) is. Its error is the conditioning's, not the
    kernel's: measured (float32, fp16 and bf16, [2, 3, 11, 16], 0-d and per head), the kernel's dq is as close
    to float64 as the original's, and the temperature's gradient, which misses the float32 tolerance at times
    (1.1e-5; the original itself reaches 1.3e-5 on other inputs), stays within how far an ulp's nudge of the
    inputs moves the exact value (1.2e-5 there): the contract's neighbour floor (fuser/numerics/contract.py)."""
    number, symbolic, folded = 1.0, [], []
    for name, inverse_name, target in FACTORS:
        c, inverse = m.bindings[name], m.bindings[inverse_name]
        if not isinstance(c, fx.Node):
            number = number / c if inverse else number * c
        elif symbolic_scalar(c):
            symbolic.append((name, inverse))
        elif (constant := constant_number(c, next(n for n in m.nodes if c in n.all_input_nodes))) is not None:
            if constant == 0 and inverse:
                return Scale(problem="the scores are divided by a tensor that holds 0")
            number = number / constant if inverse else number * constant
        else:
            problem = _fits(tensor_meta(c), metas[target], per_row=target == "scores")
            if problem:
                return Scale(problem=problem)
            folded.append((name, inverse, "k" if target == "k" else "q"))
    return Scale(number, tuple(symbolic), tuple(folded))


def scale_value(m, scale: Scale):
    """The op's scale argument: the number, times the symbolic scalars (graph values when replacing)."""
    value = scale.number
    for name, inverse in scale.symbolic:
        if value == 1.0 and not inverse:
            value = m[name]
        else:
            value = value / m[name] if inverse else value * m[name]
    return value


def fold(m, scale: Scale, x, which: str):
    """q or k with the tensors the code scaled it (or the scores) by applied, as the code wrote them."""
    for name, inverse, target in scale.folded:
        if target == which:
            x = x / m[name] if inverse else x * m[name]
    return x
