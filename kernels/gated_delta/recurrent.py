"""The gated delta rule token by token in one Triton kernel, for decode (one or a few tokens a call).

Each program owns a [Dk, BLOCK_V] block of one head's state: read once, updated in registers for
every token of the call (S ← S·exp(g_t); S ← S + k_t ⊗ β_t(v_t − Sᵀk_t); o_t = Sᵀq_t), written once.
The call's cost is the state's read and write, so blocks are narrow enough for every SM to take part.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ..language import exp, to_dtype
from ..runtime import cdiv, launch, next_pow2
from .chunk import l2_normalized, load_state, state_block, store_state


@triton.jit
def _token_row(ptr, batch, head, t, sb, st, sh, cols, n_cols):
    """One token's row of a [B, T, H, D] tensor at `cols` as float32."""
    row = ptr + batch.to(tl.int64) * sb + t * st + head * sh
    return tl.load(row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def _key_column(ptr, batch, head, t, sb, st, sh, cols, n_cols, eps, L2NORM: tl.constexpr):
    """One token's query or key as a [Dk, 1] column (normalized when L2NORM)."""
    return tl.trans(l2_normalized(_token_row(ptr, batch, head, t, sb, st, sh, cols, n_cols)[None, :], eps, L2NORM))


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, initial_ptr, out_ptr, final_ptr, length, heads, groups,
                      dk, dv, scale, eps, q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh,
                      b_sb, b_st, b_sh, HAS_INITIAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                      L2NORM: tl.constexpr):
    vblock, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    kcols = tl.arange(0, BLOCK_K)
    offsets, mask, vcols = state_block(vblock, dk, dv, BLOCK_K, BLOCK_V)
    state = load_state(initial_ptr, bh, offsets, mask, dk, dv, HAS_INITIAL, BLOCK_K, BLOCK_V)
    for t in range(length):
        query = _key_column(q_ptr, batch, head // groups, t, q_sb, q_st, q_sh, kcols, dk, eps, L2NORM)
        key = _key_column(k_ptr, batch, head // groups, t, k_sb, k_st, k_sh, kcols, dk, eps, L2NORM)
        value = _token_row(v_ptr, batch, head, t, v_sb, v_st, v_sh, vcols, dv)
        token = batch.to(tl.int64) * g_sb + t * g_st + head * g_sh
        decay = exp(tl.load(g_ptr + token).to(tl.float32))
        beta = tl.load(beta_ptr + batch.to(tl.int64) * b_sb + t * b_st + head * b_sh).to(tl.float32)
        state = state * decay
        predicted = tl.sum(state * key, axis=0)
        state = state + key * ((value - predicted) * beta)[None, :]
        out = tl.sum(state * query, axis=0) * scale
        out_row = out_ptr + ((batch.to(tl.int64) * length + t) * heads + head) * dv
        tl.store(out_row + vcols, to_dtype(out, out_ptr.dtype.element_ty), mask=vcols < dv)
    store_state(final_ptr, bh, offsets, mask, dk, dv, state)


@dataclass(frozen=True)
class RecurrentTiling:
    """Value columns per program and warps of one recurrent launch (`recurrent_tiling` picks; sweeps pass others)."""
    block_v: int
    num_warps: int = 4


def recurrent_tiling(batch_heads: int, head_dim_k: int, head_dim_v: int) -> RecurrentTiling:
    """32 value columns a program, or 16 when fewer than ~512 programs would run (a small decode batch); warps
    for 128 state values a thread. The H200 sweep (B32, 16/32 heads, D128, RESULTS.md): 1 warp 40.9 us, 90% of
    the copy bandwidth, against 42.4 us with 4 warps and 52.1 with 8; 16 columns 42.5 us with 1 warp."""
    block = min(32 if batch_heads * cdiv(head_dim_v, 32) >= 512 else 16, max(16, next_pow2(head_dim_v)))
    return RecurrentTiling(block, max(1, max(16, next_pow2(head_dim_k)) * block // (32 * 128)))


def recurrent_forward(q, k, v, g, beta, initial_state, scale: float, l2norm: bool, eps: float, out, final,
                      tiling: RecurrentTiling | None = None) -> None:
    """Write o into `out` ([B, T, Hv, Dv], contiguous) and the final state into `final` (float32); `tiling`
    defaults to `recurrent_tiling` (benchmarks/bench_gated_delta.py --decode-sweep passes others)."""
    batch, length, heads_k, dk = k.shape
    heads, dv = v.shape[2], v.shape[3]
    tiling = tiling or recurrent_tiling(batch * heads, dk, dv)
    launch(_recurrent_kernel, (cdiv(dv, tiling.block_v), batch * heads), ("gated_delta.recurrent",),
           q, k, v, g, beta, initial_state, out, final, length, heads, heads // heads_k, dk, dv, scale, eps,
           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride(), *beta.stride(),
           HAS_INITIAL=initial_state is not None, BLOCK_K=max(16, next_pow2(dk)), BLOCK_V=tiling.block_v,
           L2NORM=l2norm, num_warps=tiling.num_warps)
