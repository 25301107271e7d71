"""The chunkwise forward of the gated delta rule in three Triton kernels (reference.py says what it computes).

Within a chunk of C tokens the C updates fold into one unit lower-triangular system,
    (I + A) with A[i, j] = β_i (k_i·k_j) exp(G_i − G_j) for j < i,   G = cumulative log decay in the chunk,
whose inverse turns the chunk's tokens into what they write, u = (I + A)⁻¹(β v), and how they read
the state the chunk starts from, w = (I + A)⁻¹(β exp(G) k) (the WY form). Then:
    1. `_intra_chunk_kernel`, every chunk in parallel: A, its inverse by forward substitution, w and u;
    2. `_state_scan_kernel`, chunk after chunk per (batch, head, value block), the state in registers:
       u ← u − w·S (what each token really writes), S ← S·exp(G_last) + (k·exp(G_last − G))ᵀ·u,
       keeping the state each chunk starts from;
    3. `_output_kernel`, every chunk in parallel: o = (q·S)·exp(G) + tril(q·kᵀ·exp(G_i − G_j))·u.
Everything is float32 (the dots take tf32 for 16-bit inputs, full float32 for float32 inputs); scratch:
w and u [B, Hv, T, D] and the chunk-start states [B, Hv, chunks, Dk, Dv], float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..language import exp, to_dtype
from ..runtime import cdiv, launch, next_pow2


@triton.jit
def load_heads_rows(ptr, batch, head, rows, row_ok, row_stride, batch_stride, head_stride, cols, n_cols):
    """A [rows, cols] float32 tile of a [B, T, H, D] tensor whose last dim is contiguous (0 outside it)."""
    pointers = ptr + batch.to(tl.int64) * batch_stride + head * head_stride + rows.to(tl.int64)[:, None] * row_stride
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    return tl.load(pointers + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_token_values(ptr, batch, head, rows, row_ok, row_stride, batch_stride, head_stride):
    """g or β of one head at `rows` ([B, T, H], any strides) as float32, 0 outside the sequence."""
    pointers = ptr + batch.to(tl.int64) * batch_stride + head * head_stride + rows.to(tl.int64) * row_stride
    return tl.load(pointers, mask=row_ok, other=0.0).to(tl.float32)


@triton.jit
def l2_normalized(x, eps, L2NORM: tl.constexpr):
    """Rows of `x` divided by sqrt(Σx² + eps) when L2NORM."""
    if L2NORM:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) + eps)[:, None]
    return x


@triton.jit
def _chunk_rows(chunk, length, CHUNK: tl.constexpr):
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    return rows, rows < length


@triton.jit
def _decay_within(log_decay, CHUNK: tl.constexpr, INCLUSIVE: tl.constexpr):
    """exp(G_i − G_j) on and below the diagonal (strictly below unless INCLUSIVE), 0 above."""
    i = tl.arange(0, CHUNK)
    below = (i[:, None] >= i[None, :]) if INCLUSIVE else (i[:, None] > i[None, :])
    return tl.where(below, exp(tl.where(below, log_decay[:, None] - log_decay[None, :], 0.0)), 0.0)


@triton.jit
def _intra_chunk_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, length, heads, groups, dk, dv, eps,
                        k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh, b_sb, b_st, b_sh,
                        CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr,
                        PRECISION: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows, row_ok = _chunk_rows(chunk, length, CHUNK)
    kcols, vcols = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V)
    key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                        eps, L2NORM)
    log_decay = tl.cumsum(load_token_values(g_ptr, batch, head, rows, row_ok, g_st, g_sb, g_sh), axis=0)
    beta = load_token_values(beta_ptr, batch, head, rows, row_ok, b_st, b_sb, b_sh)
    a = tl.dot(key, tl.trans(key), input_precision=PRECISION) * beta[:, None] * _decay_within(log_decay, CHUNK, False)
    # (I + A)⁻¹ = I + N, row by row: N_i = −A_i − Σ_{m<i} A_im N_m (rows 0 and 1 are −A's already; rows past
    # the sequence are 0 in A and stay so)
    i = tl.arange(0, CHUNK)
    n = -a
    for r in range(2, tl.minimum(length - chunk * CHUNK, CHUNK)):
        a_row = tl.sum(tl.where((i == r)[:, None], a, 0.0), axis=0)
        n_row = -a_row - tl.sum(a_row[:, None] * n, axis=0)
        n = tl.where((i == r)[:, None], n_row[None, :], n)
    inverse = n + (i[:, None] == i[None, :]).to(tl.float32)
    out_rows = (bh.to(tl.int64) * length + rows)[:, None]
    w = tl.dot(inverse, key * (beta * exp(log_decay))[:, None], input_precision=PRECISION)
    tl.store(w_ptr + out_rows * dk + kcols[None, :], w, mask=row_ok[:, None] & (kcols < dk)[None, :])
    value = load_heads_rows(v_ptr, batch, head, rows, row_ok, v_st, v_sb, v_sh, vcols, dv)
    u = tl.dot(inverse, value * beta[:, None], input_precision=PRECISION)
    tl.store(u_ptr + out_rows * dv + vcols[None, :], u, mask=row_ok[:, None] & (vcols < dv)[None, :])


@triton.jit
def _state_scan_kernel(k_ptr, g_ptr, w_ptr, u_ptr, states_ptr, initial_ptr, final_ptr, length, heads, groups, dk,
                       dv, n_chunks, eps, k_sb, k_st, k_sh, g_sb, g_st, g_sh, HAS_INITIAL: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Overwrites u with what each token writes (u − w·S) and stores the state every chunk starts from."""
    vblock, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    kcols = tl.arange(0, BLOCK_K)
    vcols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    state_offsets = kcols[:, None] * dv + vcols[None, :]
    state_mask = (kcols < dk)[:, None] & (vcols < dv)[None, :]
    state = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    if HAS_INITIAL:
        state = tl.load(initial_ptr + bh.to(tl.int64) * dk * dv + state_offsets, mask=state_mask, other=0.0)
    for chunk in range(n_chunks):
        tl.store(states_ptr + (bh.to(tl.int64) * n_chunks + chunk) * dk * dv + state_offsets, state, mask=state_mask)
        rows, row_ok = _chunk_rows(chunk, length, CHUNK)
        key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                            eps, L2NORM)
        log_decay = tl.cumsum(load_token_values(g_ptr, batch, head, rows, row_ok, g_st, g_sb, g_sh), axis=0)
        # the chunk's total decay as the cumulative sum's last row (g is 0 past the sequence): the same float
        # as G at the chunk's last token, so its own write decays by exactly exp(0)
        last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, log_decay, 0.0), axis=0)
        scratch_rows = (bh.to(tl.int64) * length + rows)[:, None]
        w = tl.load(w_ptr + scratch_rows * dk + kcols[None, :], mask=row_ok[:, None] & (kcols < dk)[None, :], other=0.0)
        u_pointers = u_ptr + scratch_rows * dv + vcols[None, :]
        u_mask = row_ok[:, None] & (vcols < dv)[None, :]
        written = tl.load(u_pointers, mask=u_mask, other=0.0) - tl.dot(w, state, input_precision=PRECISION)
        tl.store(u_pointers, written, mask=u_mask)
        decayed_key = key * exp(last - log_decay)[:, None]
        state = state * exp(last) + tl.dot(tl.trans(decayed_key), written, input_precision=PRECISION)
    tl.store(final_ptr + bh.to(tl.int64) * dk * dv + state_offsets, state, mask=state_mask)


@triton.jit
def _output_kernel(q_ptr, k_ptr, g_ptr, states_ptr, written_ptr, out_ptr, length, heads, groups, dk, dv, n_chunks,
                   scale, eps, q_sb, q_st, q_sh, k_sb, k_st, k_sh, g_sb, g_st, g_sh, CHUNK: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr, PRECISION: tl.constexpr):
    chunk, vblock, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = bh // heads, bh % heads
    rows, row_ok = _chunk_rows(chunk, length, CHUNK)
    kcols = tl.arange(0, BLOCK_K)
    vcols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    query = l2_normalized(load_heads_rows(q_ptr, batch, head // groups, rows, row_ok, q_st, q_sb, q_sh, kcols, dk),
                          eps, L2NORM) * scale
    key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                        eps, L2NORM)
    log_decay = tl.cumsum(load_token_values(g_ptr, batch, head, rows, row_ok, g_st, g_sb, g_sh), axis=0)
    state = tl.load(states_ptr + (bh.to(tl.int64) * n_chunks + chunk) * dk * dv + kcols[:, None] * dv + vcols[None, :],
                    mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0)
    v_mask = row_ok[:, None] & (vcols < dv)[None, :]
    written = tl.load(written_ptr + (bh.to(tl.int64) * length + rows)[:, None] * dv + vcols[None, :], mask=v_mask,
                      other=0.0)
    scores = tl.dot(query, tl.trans(key), input_precision=PRECISION) * _decay_within(log_decay, CHUNK, True)
    out = tl.dot(query, state, input_precision=PRECISION) * exp(log_decay)[:, None] \
        + tl.dot(scores, written, input_precision=PRECISION)
    out_rows = ((batch.to(tl.int64) * length + rows) * heads + head)[:, None] * dv
    tl.store(out_ptr + out_rows + vcols[None, :], to_dtype(out, out_ptr.dtype.element_ty), mask=v_mask)


def chunk_size(head_dim_k: int) -> int:
    """Tokens per chunk: 64 up to Dk 128 (the [C, Dk] tiles and the C×C system stay in registers), 32 above."""
    return 64 if head_dim_k <= 128 else 32


def value_block(head_dim_k: int, head_dim_v: int) -> int:
    """Value columns per program of the scan and the output: the [Dk, BLOCK_V] state block stays in registers
    (64 columns up to Dk 128, 32 above)."""
    return min(64 if head_dim_k <= 128 else 32, max(16, next_pow2(head_dim_v)))


def chunk_forward(q, k, v, g, beta, initial_state, scale: float, l2norm: bool, eps: float, out: torch.Tensor,
                  final: torch.Tensor, chunk: int | None = None) -> None:
    """Write o into `out` ([B, T, Hv, Dv], contiguous) and the final state into `final` (float32)."""
    batch, length, heads_k, dk = k.shape
    heads, dv = v.shape[2], v.shape[3]
    chunk = chunk or chunk_size(dk)
    n_chunks = cdiv(length, chunk)
    block_k, block_v = max(16, next_pow2(dk)), value_block(dk, dv)
    f32 = dict(dtype=torch.float32, device=q.device)
    w = torch.empty(batch, heads, length, dk, **f32)
    written = torch.empty(batch, heads, length, dv, **f32)
    states = torch.empty(batch, heads, n_chunks, dk, dv, **f32)
    groups = heads // heads_k
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    shape = dict(CHUNK=chunk, BLOCK_K=block_k, L2NORM=l2norm, PRECISION=precision)
    common = (length, heads, groups, dk, dv)
    launch(_intra_chunk_kernel, (n_chunks, batch * heads), ("gated_delta.intra",),
           k, v, g, beta, w, written, *common, eps, *k.stride()[:3], *v.stride()[:3], *g.stride(), *beta.stride(),
           BLOCK_V=max(16, next_pow2(dv)), num_warps=4 if block_k <= 64 else 8, **shape)
    launch(_state_scan_kernel, (cdiv(dv, block_v), batch * heads), ("gated_delta.scan",),
           k, g, w, written, states, initial_state, final, *common, n_chunks, eps, *k.stride()[:3], *g.stride(),
           HAS_INITIAL=initial_state is not None, BLOCK_V=block_v, num_warps=4, **shape)
    launch(_output_kernel, (n_chunks, cdiv(dv, block_v), batch * heads), ("gated_delta.output",),
           q, k, g, states, written, out, *common, n_chunks, scale, eps, *q.stride()[:3], *k.stride()[:3],
           *g.stride(), BLOCK_V=block_v, num_warps=4, **shape)
