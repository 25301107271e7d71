"""The eager fast path of the fused ops: their implementation and autograd formula without the dispatcher."""
from __future__ import annotations

import torch


# Eager calls. A composite op (attention, moe_route, moe_experts) reaches its custom op through the
# dispatcher and, where a gradient is recorded, through custom_op's autograd wrapper, which re-reads the
# op's schema for every argument of every call (torch's fill_defaults: 45 us of the ~100 us host time of
# an attention call with 13 arguments, on this project's CPU). Eager calls on plain tensors need none of those
# layers: `direct_call` runs the implementation itself, under an autograd.Function that uses the op's
# own setup_context and backward. Tracing, dispatch modes, functorch transforms, tensor subclasses and
# the profiler (whose events name the op) take the op.

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
