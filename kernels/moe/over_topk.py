"""Per token, over its k choices: the experts' output (and dx) summed over k, and d(routing weight), in one launch.

A backward is four launches (GRAD_H, GRAD_X, this one, the weight gradients: gemm.py), a forward four (the
plan's one, plan.py; GATE_UP, DOWN, this one), biases or not: under CUDA graphs each launch costs about as much
as a small kernel's work, so d(weight)'s partial sums, its cast and the down bias's share join dx's sum here
rather than running as launches of their own.
"""
import torch
import triton
import triton.language as tl

from ..language import to_dtype
from ..runtime import cdiv, interpreting, launch, next_pow2


@triton.jit
def _over_topk_kernel(rows_ptr, ids_ptr, out_ptr, partials_ptr, grad_out_ptr, bias_ptr, stride_bias_e, stride_bias_n,
                      d_weights_ptr, H, E, GRAINS,
                      TOPK: tl.constexpr, ROWS: tl.constexpr, WEIGHTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr):
    """Per token, over its k choices (those whose expert id is outside [0, E) skipped, in fp32):
    ROWS: out[t] = sum_k rows[t * TOPK + k] (the output, or dx);
    WEIGHTS (the programs of the first column block): d_weights[t * TOPK + k] = the sum of that row's d(weight)
    partials, plus (HAS_BIAS) grad_out[t] . down_bias[expert], the down bias's share; 0 for skipped choices."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if ROWS:
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in range(TOPK):
            expert = tl.load(ids_ptr + token * TOPK + k)
            width = tl.where((expert >= 0) & (expert < E), H, 0)
            acc += tl.load(rows_ptr + (token * TOPK + k) * H + offs, mask=offs < width, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * H + offs, to_dtype(acc, out_ptr.dtype.element_ty), mask=offs < H)
    if WEIGHTS:
        if tl.program_id(1) == 0:
            grains = tl.arange(0, BLOCK_G)
            for k in range(TOPK):
                row = token * TOPK + k
                expert = tl.load(ids_ptr + row)
                routed = (expert >= 0) & (expert < E)
                total = tl.sum(tl.load(partials_ptr + row * GRAINS + grains,
                                       mask=grains < tl.where(routed, GRAINS, 0), other=0.0), 0)
                if HAS_BIAS:
                    width = tl.where(routed, H, 0)
                    dots = tl.zeros((BLOCK_H,), dtype=tl.float32)
                    for first in range(0, H, BLOCK_H):
                        cols = first + tl.arange(0, BLOCK_H)
                        g = tl.load(grad_out_ptr + token * H + cols, mask=cols < width, other=0.0).to(tl.float32)
                        b = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + cols * stride_bias_n,
                                    mask=cols < width, other=0.0)
                        dots += g * b.to(tl.float32)
                    total += tl.sum(dots, 0)
                tl.store(d_weights_ptr + row, to_dtype(total, d_weights_ptr.dtype.element_ty))


def over_topk(topk_ids, experts, rows=None, out=None, *, partials=None, grad_out=None, down_bias=None,
              d_weights=None):
    """One launch, per token over its k choices (unrouted ids skipped): out [T, H] = rows [T*K, H] summed over k
    (the output, or dx; where rows is given); d_weights [T*K] = the GRAD_H partials [T*K, grains] summed, plus
    grad_out[t] . down_bias[ids[t, k]] where down_bias is given (where d_weights is given; 0 for unrouted ids)."""
    tokens, top_k = topk_ids.shape
    hidden = (out if out is not None else grad_out).shape[1]
    block_h = 16 if interpreting() else min(1024, next_pow2(hidden))
    if not tokens:
        return
    unused = topk_ids.new_empty(0, dtype=torch.float32)
    with_rows, with_weights, with_bias = rows is not None, d_weights is not None, down_bias is not None
    grains = partials.shape[1] if with_weights else 0
    bias_strides = (down_bias.stride(0), down_bias.stride(1)) if with_bias else (0, 0)
    launch(_over_topk_kernel, (tokens, cdiv(hidden, block_h) if with_rows else 1),
           ("moe.over_topk", tokens, hidden, with_rows, with_weights, with_bias),
           rows if with_rows else unused, topk_ids, out if with_rows else unused,
           partials if with_weights else unused, grad_out if with_bias else unused,
           down_bias if with_bias else unused, *bias_strides, d_weights if with_weights else unused,
           hidden, experts, grains, top_k, with_rows, with_weights, with_bias, block_h, next_pow2(max(grains, 1)),
           num_warps=4)
