"""The chunkwise backward of the gated delta rule in Triton (chunk.py has the forward and its notation).

Per chunk, with q̃ = scale·q̂, Γ = exp(G), λ = exp(G_last), K̃ = k·exp(G_last − G), T = (I + A)⁻¹,
M = tril(q̃kᵀ ⊙ exp(G_i − G_j)), written v' = u − w·S and dS' the gradient of the state the chunk ends with:
    dv' = Mᵀ·dO + K̃·dS'                         dS = (q̃Γ)ᵀ·dO + λ·dS' − wᵀ·dv'
and the inputs' gradients through o = (q̃Γ)·S + M·v', S' = λS + K̃ᵀv', u = T(βv), w = T(βΓk), dT = −T dA T
(dg sums each term's own tokens, never a cumulative sum's difference: see `_sum_over_rows`):
    1. the forward's intra-chunk kernel and scan again (w, v', the states, G; chunk.chunk_states);
    2. `_state_grad_scan_kernel`, chunk after chunk from the last, per (batch, head, value block): dv' and the
       gradient of the state each chunk ends with;
    3. `_chunk_grads_kernel`, every chunk in parallel, its value blocks in a loop: dq, dk (per value head,
       summed over a key head's value heads on the host), dv, dβ and dg (the reverse cumulative sum of dG),
       through the l2 normalization.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..language import exp, to_dtype
from ..runtime import cdiv, launch
from .chunk import (SCAN_STAGES, Geometry, chunk_rows, chunk_states, decay_within, l2_normalized, load_heads_rows, load_state,
                    load_token_values, state_block, store_state, stored_log_decays, unit_lower_inverse)


@triton.jit
def _l2_normalized_backward(x, x_hat, d_hat, eps, L2NORM: tl.constexpr):
    """The gradient of x from that of x̂ = x / sqrt(Σx² + eps): (dx̂ − x̂(x̂·dx̂)) / sqrt(Σx² + eps)."""
    if L2NORM:
        inverse_norm = tl.rsqrt(tl.sum(x * x, axis=1) + eps)
        d_hat = (d_hat - x_hat * tl.sum(x_hat * d_hat, axis=1)[:, None]) * inverse_norm[:, None]
    return d_hat


@triton.jit
def _state_grad_scan_kernel(q_ptr, k_ptr, decays_ptr, w_ptr, do_ptr, dstates_ptr, dwritten_ptr, dfinal_ptr,
                            dinitial_ptr, length, heads, groups, dk, dv, n_chunks, scale, eps, q_sb, q_st, q_sh,
                            k_sb, k_st, k_sh, do_sb, do_st, do_sh, HAS_DFINAL: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Stores dv' and, per chunk, the gradient of the state it ends with; the initial state's gradient last."""
    vblock, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    kcols = tl.arange(0, BLOCK_K)
    offsets, mask, vcols = state_block(vblock, dk, dv, BLOCK_K, BLOCK_V)
    d_state = load_state(dfinal_ptr, bh, offsets, mask, dk, dv, HAS_DFINAL, BLOCK_K, BLOCK_V)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        store_state(dstates_ptr, bh * n_chunks + chunk, offsets, mask, dk, dv, d_state)
        rows, row_ok = chunk_rows(chunk, length, CHUNK)
        query = l2_normalized(load_heads_rows(q_ptr, batch, head // groups, rows, row_ok, q_st, q_sb, q_sh, kcols, dk),
                              eps, L2NORM) * scale
        key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                            eps, L2NORM)
        log_decay, low, to_end, chunk_decay = stored_log_decays(decays_ptr, bh, chunk, length, CHUNK)
        d_out = load_heads_rows(do_ptr, batch, head, rows, row_ok, do_st, do_sb, do_sh, vcols, dv)
        scratch_rows = (bh.to(tl.int64) * length + rows)[:, None]
        w = tl.load(w_ptr + scratch_rows * dk + kcols[None, :], mask=row_ok[:, None] & (kcols < dk)[None, :], other=0.0)
        scores = tl.dot(query, tl.trans(key), input_precision=PRECISION) * decay_within(log_decay, low, CHUNK, True)
        d_written = tl.dot(tl.trans(scores), d_out, input_precision=PRECISION) \
            + tl.dot(key * to_end[:, None], d_state, input_precision=PRECISION)
        tl.store(dwritten_ptr + scratch_rows * dv + vcols[None, :], d_written,
                 mask=row_ok[:, None] & (vcols < dv)[None, :])
        d_state = tl.dot(tl.trans(query * exp(log_decay)[:, None]), d_out, input_precision=PRECISION) \
            + chunk_decay * d_state - tl.dot(tl.trans(w), d_written, input_precision=PRECISION)
    store_state(dinitial_ptr, bh, offsets, mask, dk, dv, d_state)


@triton.jit
def _row_minus_column_sums(x):
    """Σ_j x_ij − Σ_j x_ji: G's gradient through a C×C factor exp(G_i − G_j), x being its gradient ⊙ it."""
    return tl.sum(x, axis=1) - tl.sum(x, axis=0)


@triton.jit
def _sum_over_rows(x, CHUNK: tl.constexpr, FROM_HERE_ON: tl.constexpr):
    """Σ_{j ≥ i} x_j (FROM_HERE_ON) or Σ_{j < i} x_j for every row i, each sum of its own terms only: a
    cumulative sum's differences (total − cumsum, cumsum − x) cancel a large x_j against itself, and g's
    gradient under strong decays (exp(g) ~ 1e-9) is far smaller than the terms beside it."""
    i = tl.arange(0, CHUNK)
    counted = (i[None, :] >= i[:, None]) if FROM_HERE_ON else (i[None, :] < i[:, None])
    return tl.sum(tl.where(counted, x[None, :], 0.0), axis=1)


@triton.jit
def _chunk_grads_kernel(q_ptr, k_ptr, v_ptr, decays_ptr, beta_ptr, do_ptr, states_ptr, dstates_ptr, written_ptr,
                        dwritten_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, length, heads, groups, dk, dv,
                        n_chunks, scale, eps, q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
                        b_sb, b_st, b_sh, do_sb, do_st, do_sh, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_V: tl.constexpr, L2NORM: tl.constexpr, PRECISION: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows, row_ok = chunk_rows(chunk, length, CHUNK)
    kcols = tl.arange(0, BLOCK_K)
    k_mask = row_ok[:, None] & (kcols < dk)[None, :]
    raw_q = load_heads_rows(q_ptr, batch, head // groups, rows, row_ok, q_st, q_sb, q_sh, kcols, dk)
    raw_k = load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk)
    q_hat, key = l2_normalized(raw_q, eps, L2NORM), l2_normalized(raw_k, eps, L2NORM)
    query = q_hat * scale
    log_decay, low, to_end, chunk_decay = stored_log_decays(decays_ptr, bh, chunk, length, CHUNK)
    beta = load_token_values(beta_ptr, batch, head, rows, row_ok, b_st, b_sb, b_sh)
    gamma = exp(log_decay)
    within = decay_within(log_decay, low, CHUNK, True)
    strictly = tl.where(rows[:, None] > rows[None, :], within, 0.0)  # the diagonal's exp(0) off: one exp, not two
    key_products = tl.dot(key, tl.trans(key), input_precision=PRECISION)
    inverse = unit_lower_inverse(key_products * beta[:, None] * strictly, CHUNK, PRECISION)
    scores = tl.dot(query, tl.trans(key), input_precision=PRECISION) * within
    d_out_states = tl.zeros([CHUNK, BLOCK_K], tl.float32)    # Σ_v dO·Sᵀ
    d_scores = tl.zeros([CHUNK, CHUNK], tl.float32)          # Σ_v dO·v'ᵀ
    d_decayed_key = tl.zeros([CHUNK, BLOCK_K], tl.float32)   # Σ_v v'·dS'ᵀ
    d_w = tl.zeros([CHUNK, BLOCK_K], tl.float32)             # −Σ_v dv'·Sᵀ
    d_inverse = tl.zeros([CHUNK, CHUNK], tl.float32)         # Σ_v dv'·(βv)ᵀ, the (βΓk) part added below
    d_beta = tl.zeros([CHUNK], tl.float32)
    state_products = tl.zeros([BLOCK_K], tl.float32)         # Σ S ⊙ dS', for λ
    scratch_rows = (bh.to(tl.int64) * length + rows)[:, None]
    for vblock in range(0, tl.cdiv(dv, BLOCK_V)):
        offsets, mask, vcols = state_block(vblock, dk, dv, BLOCK_K, BLOCK_V)
        v_mask = row_ok[:, None] & (vcols < dv)[None, :]
        state = load_state(states_ptr, bh * n_chunks + chunk, offsets, mask, dk, dv, True, BLOCK_K, BLOCK_V)
        d_state = load_state(dstates_ptr, bh * n_chunks + chunk, offsets, mask, dk, dv, True, BLOCK_K, BLOCK_V)
        d_out = load_heads_rows(do_ptr, batch, head, rows, row_ok, do_st, do_sb, do_sh, vcols, dv)
        value = load_heads_rows(v_ptr, batch, head, rows, row_ok, v_st, v_sb, v_sh, vcols, dv)
        written = tl.load(written_ptr + scratch_rows * dv + vcols[None, :], mask=v_mask, other=0.0)
        d_written = tl.load(dwritten_ptr + scratch_rows * dv + vcols[None, :], mask=v_mask, other=0.0)
        d_out_states += tl.dot(d_out, tl.trans(state), input_precision=PRECISION)
        d_scores += tl.dot(d_out, tl.trans(written), input_precision=PRECISION)
        d_decayed_key += tl.dot(written, tl.trans(d_state), input_precision=PRECISION)
        d_w -= tl.dot(d_written, tl.trans(state), input_precision=PRECISION)
        d_inverse += tl.dot(d_written, tl.trans(value * beta[:, None]), input_precision=PRECISION)
        d_beta_value = tl.dot(tl.trans(inverse), d_written, input_precision=PRECISION)  # Tᵀ·du = d(βv)
        d_beta += tl.sum(value * d_beta_value, axis=1)
        dv_rows = ((batch.to(tl.int64) * length + rows) * heads + head)[:, None] * dv
        tl.store(dv_ptr + dv_rows + vcols[None, :], to_dtype(d_beta_value * beta[:, None], dv_ptr.dtype.element_ty),
                 mask=v_mask)
        state_products += tl.sum(state * d_state, axis=1)
    # o = (q̃Γ)·S + M·v'
    d_query = d_out_states * gamma[:, None]
    d_log = tl.sum(query * d_query, axis=1)
    d_scores_decayed = d_scores * within
    d_query += tl.dot(d_scores_decayed, key, input_precision=PRECISION)
    d_key = tl.dot(tl.trans(d_scores_decayed), query, input_precision=PRECISION)
    # (the diagonal's exp(G_i − G_i) = 1 has no gradient: left out, rather than added and taken away again)
    d_log += _row_minus_column_sums(d_scores * scores * (strictly > 0))
    # S' = λS + K̃ᵀv', K̃_i = k_i·exp(Σ_{m>i} g_m): g_m gets Σ_{i<m} of those terms
    d_key += d_decayed_key * to_end[:, None]
    to_end_terms = tl.sum(key * to_end[:, None] * d_decayed_key, axis=1)
    d_g_to_end = _sum_over_rows(to_end_terms, CHUNK, False)
    d_last = chunk_decay * tl.sum(state_products, axis=0)
    # w = T(βΓk)
    d_beta_gamma_key = tl.dot(tl.trans(inverse), d_w, input_precision=PRECISION)
    beta_gamma = beta * gamma
    d_key += d_beta_gamma_key * beta_gamma[:, None]
    key_terms = tl.sum(key * d_beta_gamma_key, axis=1)
    d_beta += gamma * key_terms
    d_log += beta_gamma * key_terms
    # T = (I + A)⁻¹: dA = −Tᵀ·dT·Tᵀ, A = β_i (k_i·k_j) exp(G_i − G_j) strictly below the diagonal
    d_inverse += tl.dot(d_w, tl.trans(key * beta_gamma[:, None]), input_precision=PRECISION)
    d_a = -tl.dot(tl.dot(tl.trans(inverse), d_inverse, input_precision=PRECISION), tl.trans(inverse),
                  input_precision=PRECISION) * strictly
    d_a_products = d_a * key_products
    d_beta += tl.sum(d_a_products, axis=1)
    d_log += _row_minus_column_sums(d_a_products * beta[:, None])
    d_a_keys = d_a * beta[:, None]
    d_key += tl.dot(d_a_keys, key, input_precision=PRECISION) + tl.dot(tl.trans(d_a_keys), key,
                                                                       input_precision=PRECISION)
    # G = cumsum(g): dg = the reverse cumulative sum of dG; G_last = Σ g reaches every g
    d_g = _sum_over_rows(d_log, CHUNK, True) + d_g_to_end + d_last
    d_q = _l2_normalized_backward(raw_q, q_hat, d_query * scale, eps, L2NORM)
    d_k = _l2_normalized_backward(raw_k, key, d_key, eps, L2NORM)
    head_rows = (batch.to(tl.int64) * length + rows) * heads + head
    tl.store(dq_ptr + head_rows[:, None] * dk + kcols[None, :], d_q, mask=k_mask)
    tl.store(dk_ptr + head_rows[:, None] * dk + kcols[None, :], d_k, mask=k_mask)
    tl.store(dg_ptr + head_rows, d_g, mask=row_ok)
    tl.store(dbeta_ptr + head_rows, d_beta, mask=row_ok)


def chunk_backward(grad_out, grad_state, q, k, v, g, beta, initial_state, scale: float, l2norm: bool, eps: float):
    """(dq, dk, dv, dg, dbeta, dinitial_state) in the inputs' dtypes (dinitial_state float32)."""
    # the chunk-start states in float32: the gradients of float32 g and initial state are held to float32's tolerance
    shape = dataclasses.replace(Geometry.of(q, v), state_dtype=torch.float32)
    device = q.device
    final = shape.scratch(shape.dk, shape.dv, device=device)
    w, written, states, decays = chunk_states(shape, k, v, g, beta, initial_state, l2norm, eps, final)
    d_states = torch.empty_like(states)
    d_written = torch.empty_like(written)
    d_initial = torch.empty_like(final)
    grad_out = torch.zeros_like(v) if grad_out is None else grad_out
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_state = None if grad_state is None else grad_state.to(torch.float32).contiguous()
    bh = shape.batch * shape.heads
    launch(_state_grad_scan_kernel, (cdiv(shape.dv, shape.block_v), bh), ("gated_delta.grad_scan",),
           q, k, decays, w, grad_out, d_states, d_written, grad_state, d_initial, *shape.common(), shape.n_chunks,
           scale, eps, *q.stride()[:3], *k.stride()[:3], *grad_out.stride()[:3],
           HAS_DFINAL=grad_state is not None, BLOCK_V=shape.block_v, num_warps=4, num_stages=SCAN_STAGES,
           **shape.constexprs(l2norm))
    d_q, d_k = (torch.empty(shape.batch, shape.length, shape.heads, shape.dk, dtype=torch.float32, device=device)
                for _ in range(2))  # per value head, summed over each key head's value heads below
    d_v = torch.empty(shape.batch, shape.length, shape.heads, shape.dv, dtype=v.dtype, device=device)
    d_g, d_beta = (torch.empty(shape.batch, shape.length, shape.heads, dtype=torch.float32, device=device)
                   for _ in range(2))
    launch(_chunk_grads_kernel, (shape.n_chunks, bh), ("gated_delta.grads",),
           q, k, v, decays, beta, grad_out, states, d_states, written, d_written, d_q, d_k,
           d_v, d_g, d_beta, *shape.common(), shape.n_chunks, scale, eps, *q.stride()[:3],
           *k.stride()[:3], *v.stride()[:3], *beta.stride(), *grad_out.stride()[:3],
           BLOCK_V=shape.block_v, num_warps=8, num_stages=1,
           **shape.constexprs(l2norm))  # 2 stages: 221 KB at Dk 128
    d_q, d_k = (d.unflatten(2, (-1, shape.groups)).sum(3).to(x.dtype) for d, x in ((d_q, q), (d_k, k)))
    return d_q, d_k, d_v, d_g.to(g.dtype), d_beta.to(beta.dtype), d_initial
