"""The one fused-op recipe: a `fuser::` op with its fake, autograd and reference, the launches Inductor traces,
and the eager fast path.

    _call_forward = fused_op("rms_norm_forward", kernel, reference, fake, runs_kernels,
                             setup_context=_setup_context, backward=_backward)

    @entry_op
    def rms_norm(x: torch.Tensor, ...) -> torch.Tensor:   # fuser::rms_norm, what patterns and convert call
        return _call_forward(x, ...)

Where each call runs, chosen per call from devices, dtypes and shapes (no sync, no data read):
- eager, plain tensors: `direct_call` runs `kernel` (Triton, launches replayed) or `reference` (plain torch), with
  the op's own autograd formula, without the dispatcher;
- traced for Inductor (AOTAutograd's functionalization), CUDA tensors that the kernels take, of static shapes or
  of symbolic sizes the op's `symbolic(*args)` accepts (dynamic shapes): `kernel` itself is traced, its launches
  through `torch.library.wrap_triton` (`launching.traced_launches`),
  so Inductor's generated code launches our kernels, tunes them at compile time and never calls the op (what
  `torch.library.triton_op` does, minus its fake: triton_op registers the body as its own fake, and under
  TRITON_INTERPRET=1 Dynamo's fake run of it launches the interpreter on FakeTensors, which fails; seen on
  torch 2.13 / triton 3.9);
- anything else (CPU, the interpreter, symbolic sizes an op does not accept, dtypes the kernels do not take,
  tracing by other modes): the op itself, opaque, running `kernel` or `reference` at run time as in eager.
An op accepting symbolic sizes takes every tile, constexpr and tuning choice from what is static (head dims,
dtypes, literals; `launching.known`) or one valid for every value of the symbolic sizes, never from their
values: tracing adds no guard of its own; grids, buffer sizes and scalar arguments are symbolic expressions
Inductor's generated code computes per call (tests/test_ops.py holds every accepted op to that).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch._functorch.config as functorch_config
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from .dispatch import interpreting
from .launching import traced_launches
from .sharding import Rows, register as register_sharding


def fused_op(name: str, kernel: Callable, reference: Callable, fake: Callable, runs_kernels: Callable[..., bool], *,
             setup_context: Callable | None = None, backward: Callable | None = None, rows: Rows | None = None,
             symbolic: Callable[..., bool] | None = None) -> Callable:
    """Define `fuser::<name>` and return its direct call (see `direct_call`).

    `kernel` (its type annotations are the op's schema) launches Triton through `launching.launch`;
    `reference` computes the same in plain torch; `fake` gives the outputs' metadata; `runs_kernels(*args)` says
    whether `kernel` computes this call (devices and dtypes only); `setup_context` / `backward` are the op's
    autograd formula, the backward itself another fused op; `rows`, where a shard of the rows computes its part,
    is how the op shards under DTensor (`sharding.register`); `symbolic(*args)`, where `kernel` traces its
    launches with symbolic sizes (see the module docstring), says whether it does for these arguments (without
    it, only calls whose every size is an int are traced)."""
    def implementation(*args):
        return kernel(*args) if runs_kernels(*args) else reference(*args)

    op = torch.library.custom_op(f"fuser::{name}", implementation, mutates_args=(),
                                 schema=torch.library.infer_schema(kernel, mutates_args=()))
    op.register_fake(fake)
    op.register_torch_dispatch(FunctionalTensorMode, _inductor_launches(kernel, runs_kernels, symbolic))
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    if rows is not None:
        register_sharding(getattr(torch.ops.fuser, name).default, rows)
    return direct_call(getattr(torch.ops.fuser, name).default, implementation, setup_context, backward)


def any_sizes(*args, **kwargs) -> bool:
    """For `fused_op(symbolic=...)`: every size of every call may be symbolic."""
    return True


def entry_op(function: Callable) -> Callable:
    """`fuser::<function's name>` as a CompositeImplicitAutograd op running `function` (its annotations are the
    schema): the op that graphs and eager code call, so that an eager call reaches `function` and its direct
    calls of the fused ops beneath, and tracing sees those ops."""
    name = f"fuser::{function.__name__}"
    torch.library.define(name, torch.library.infer_schema(function, mutates_args=()))
    torch.library.impl(name, "CompositeImplicitAutograd")(function)
    return function


# Traced for Inductor. AOTAutograd runs each op under FunctionalTensorMode; this rule answers for ours.

_TRACED_TENSOR_TYPES = (FakeTensor, FunctionalTensor)


def _static(args) -> bool:
    """Every size and stride a plain int: launch sizes and tiles are then fixed at trace time (symbolic sizes
    keep the op unless the op's `symbolic` accepts them)."""
    for arg in args:
        if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return False
        if isinstance(arg, torch.Tensor) and not all(
                type(size) is int for size in (*arg.shape, *arg.stride(), arg.storage_offset())):
            return False
    return True


def _inductor_launches(kernel, runs_kernels, symbolic):
    def rule(mode, op, types, args, kwargs):
        if any(t is not torch.Tensor and not issubclass(t, _TRACED_TENSOR_TYPES) for t in types):
            return NotImplemented  # a tensor subclass of someone else's: its own dispatch first
        traced = (getattr(functorch_config, "decompose_custom_triton_ops", True)  # off under torch.export
                  and not interpreting() and all(a.is_cuda for a in args if isinstance(a, torch.Tensor))
                  and (_static(args) or (symbolic is not None and symbolic(*args, **kwargs)))
                  and runs_kernels(*args, **kwargs))
        if not traced:
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode, traced_launches():
            return kernel(*args, **kwargs)
    return rule


# Eager calls. A call through the dispatcher reaches the op's implementation through custom_op's autograd
# wrapper where a gradient is recorded, which re-reads the op's schema for every argument of every call
# (torch's fill_defaults: 45 us of the ~100 us host time of an attention call with 13 arguments, on this
# project's CPU). Eager calls on plain tensors need none of those layers: `direct_call` runs the
# implementation itself, under an autograd.Function that uses the op's own setup_context and backward.
# Tracing, dispatch modes, functorch transforms, tensor subclasses and the profiler (whose events name the
# op) take the op.

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(tensors) -> bool:
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and not torch._C._autograd._profiler_enabled() and all(type(t) in _PLAIN_TENSORS for t in tensors))


class _DirectAutograd(torch.autograd.Function):
    """An op's implementation with the op's registered autograd formula."""

    @staticmethod
    def forward(ctx, implementation, setup_context, backward, *inputs):
        output = implementation(*inputs)
        ctx.needs_input_grad = ctx.needs_input_grad[3:]  # the formula reads the op's inputs' flags
        setup_context(ctx, inputs, output)
        ctx.formula = backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, *ctx.formula(ctx, *grads))


def direct_call(op, implementation, setup_context=None, backward=None):
    """A function computing `op(*args)`: `implementation(*args)` on plain eager tensors (through the op's
    `setup_context` / `backward` where a gradient is recorded; without them such calls take the op)."""
    def call(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not _plain_eager(tensors):
            return op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return op(*args) if backward is None else _DirectAutograd.apply(implementation, setup_context,
                                                                             backward, *args)
        return implementation(*args)
    return call
