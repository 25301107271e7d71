"""Backward: FlashAttention-2's recomputation from the saved log-sum-exp, in three kernels.

1. preprocess: Δ = rowsum(dO ∘ O) per query row, and a per-head flag for rows whose lse is low
   enough that skipped tiles carry weight (fully masked rows, see tiles.py).
2. dK/dV: one program per key block and KV head; it loops over the group's query heads and
   their query tiles and accumulates dK, dV in registers (no atomics, K/V read once).
3. dQ: one program per query block, looping over key tiles like the forward. It recomputes the
   scores and dP (7 matmuls in all instead of 5), which on H100 is 3× faster than adding each
   tile's dQ share into a float32 buffer with atomics from kernel 2 (benchmarks/RESULTS.md).

Tiles that the forward skipped are skipped here too, except for flagged heads, where the
skipped query tiles holding flagged rows are visited with full masking. That reproduces the
replaced code's gradients for fully masked rows: with a finite fill, dV gets the uniform
weights over all keys, and dQ/dK get nothing from replaced scores (masked_fill cuts their
gradient; an added mask, a float tensor or masking "add", passes it, as in the naive code).
Rows SDPA zeroes have a log-sum-exp of +inf: every probability, so every gradient, is 0 there.
A block whose gradients are not finite is redone by EXACT passes (tiles.py: the NaN rule).
Sinks change nothing here: the statistics hold them; their own gradient is plan.backward's.

Grouped arguments (strides, sizes, literals; HEAD, RULE, NUMERICS) are laid out in tiles.py.
The saved statistics [B, Hq, Lq, 2] and Δ [B, Hq, Lq] are contiguous.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from ..language import to_dtype
from ..runtime import autotune, flat_kernel, interpreting
from .forward import registers_fit, tuning_pays
from .tiles import (EXACT_BLOCK, FULL, HEAD_BLOCK_D, HEAD_BLOCK_DV, HEAD_PAD_D, HEAD_PAD_DV, NUMERICS_DOT_PRECISION,
                    PARTIAL, RULE_CAUSAL, RULE_DROPOUT, RULE_MASK_KIND, RULE_SOFTCAP, RULE_WINDOWED, SKIP, HeadBlocks,
                    any_nonfinite, dropout_keep, kernel_literals, key_tiles, load_tile, mma_operand, open_rows,
                    open_run, probabilities, query_tiles, rows_saturated, selected_dot, tile_scores)


@triton.jit
def backward_preprocess_program(Out, dOut, Stats, Delta, HeadFlags, so, sg, Hq, Lq, Dv, saturation_lse,
                                CAN_SKIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    saturation_lse = tl.cast(saturation_lse, tl.float32)  # Inductor passes Python floats as float64
    bh = tl.program_id(1)
    batch = (bh // Hq).to(tl.int64)
    head = (bh % Hq).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    dv = tl.arange(0, BLOCK_DV)
    o = load_tile(Out + batch * so[0] + head * so[1] + rows[:, None] * so[2] + dv[None, :] * so[3], row_ok, dv < Dv,
                  True, True).to(tl.float32)
    do = load_tile(dOut + batch * sg[0] + head * sg[1] + rows[:, None] * sg[2] + dv[None, :] * sg[3], row_ok,
                   dv < Dv, True, True).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * Lq + rows, tl.sum(o * do, 1), mask=row_ok)
    if CAN_SKIP:
        stats = Stats + (bh.to(tl.int64) * Lq + rows) * 2
        lse = tl.load(stats, mask=row_ok, other=0.0) + tl.load(stats + 1, mask=row_ok, other=0.0)
        tl.atomic_max(HeadFlags + bh, rows_saturated(lse, row_ok, saturation_lse).to(tl.int32))


@triton.jit
def dkdv_tile(dk, dv, k, v, m, k_idx, Q_head, dO_head, Stats_head, Delta_head, mask_head, stream, sq, sg, sm,
              sizes, literals, BLOCK_M: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
              RULE: tl.constexpr, ADD_OPEN: tl.constexpr, NUMERICS: tl.constexpr):
    """One query tile's share of dK and dV, in the transposed orientation
    (rows are keys): p^T = exp2(s^T − lse), dV += p^T dO, dS^T = p^T (dP^T − Δ), dK += dS^T Q; with EXACT,
    each product formed only where the query row reaches the key (tiles.py); ADD_OPEN as in tile_scores."""
    Lq, Lk, D, Dv = sizes[2], sizes[3], sizes[4], sizes[5]
    dropout_p, seed = literals[6], literals[7]
    q_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_idx < Lq
    d = tl.arange(0, HEAD[HEAD_BLOCK_D])
    dvi = tl.arange(0, HEAD[HEAD_BLOCK_DV])
    q = load_tile(Q_head + q_idx[:, None] * sq[2] + d[None, :] * sq[3], q_ok, d < D, MASKED, HEAD[HEAD_PAD_D])
    do = load_tile(dO_head + q_idx[:, None] * sg[2] + dvi[None, :] * sg[3], q_ok, dvi < Dv, MASKED, HEAD[HEAD_PAD_DV])
    if MASKED:  # rows past Lq get p = 0 and Δ = 0
        shift = tl.load(Stats_head + 2 * q_idx, mask=q_ok, other=float("inf"))
        log2_sum = tl.load(Stats_head + 2 * q_idx + 1, mask=q_ok, other=0.0)
        delta = tl.load(Delta_head + q_idx, mask=q_ok, other=0.0)
    else:
        shift = tl.load(Stats_head + 2 * q_idx)
        log2_sum = tl.load(Stats_head + 2 * q_idx + 1)
        delta = tl.load(Delta_head + q_idx)
    q = mma_operand(q, NUMERICS)
    do = mma_operand(do, NUMERICS)
    qk_t = tl.dot(k, tl.trans(q), input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
    q_open = open_rows(shift + log2_sum, q_ok, literals[5])
    scores_t, reach_t, passes_t, softcap_grad_t = tile_scores(qk_t, q_idx[None, :], q_open[None, :], q_ok[None, :],
                                                              k_idx[:, None], mask_head + q_idx[None, :].to(tl.int64)
                                                              * sm[2] + k_idx[:, None] * sm[3], Lk, literals, MASKED,
                                                              EXACT, RULE, ADD_OPEN)
    p_t = probabilities(scores_t, reach_t, shift[None, :], log2_sum[None, :], MASKED, EXACT)
    dp_t = tl.dot(v, tl.trans(do), input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
    if RULE[RULE_DROPOUT]:
        undropped_t = dropout_keep(seed, stream, q_idx[None, :], k_idx[:, None], dropout_p)
        dropped_t = tl.where(undropped_t, p_t * (1.0 / (1.0 - dropout_p)), 0.0)
        dp_t = tl.where(undropped_t, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        dropped_t = p_t
    dv = selected_dot(mma_operand(to_dtype(dropped_t, Q_head.dtype.element_ty), NUMERICS), do, reach_t, dv,
                      MASKED and EXACT, NUMERICS)
    ds_t = p_t * (dp_t - delta[None, :])
    if RULE[RULE_SOFTCAP]:
        ds_t = ds_t * softcap_grad_t
    if MASKED:  # selected: replaced (or, EXACT, unreached) scores pass no gradient (not even NaN)
        ds_t = tl.where(passes_t, ds_t, 0.0)
    dk = selected_dot(mma_operand(to_dtype(ds_t, Q_head.dtype.element_ty), NUMERICS), q, passes_t, dk,
                      MASKED and EXACT, NUMERICS)
    return dk, dv


@triton.jit
def tile_saturated(Stats_head, m, Lq, saturation_lse, BLOCK_M: tl.constexpr):
    q_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)
    lse = (tl.load(Stats_head + 2 * q_idx, mask=q_idx < Lq, other=float("inf"))
           + tl.load(Stats_head + 2 * q_idx + 1, mask=q_idx < Lq, other=0.0))
    return rows_saturated(lse, q_idx < Lq, saturation_lse)


@triton.jit
def dkdv_block(k, v, k_idx, n_block, batch, kv_head, Q, Mask, Classes, dOut, Stats, Delta, HeadFlags, sq, sm, sc, sg,
               sizes, literals, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, CELL: tl.constexpr,
               RULE: tl.constexpr, CAN_SKIP: tl.constexpr, EXACT: tl.constexpr, NUMERICS: tl.constexpr):
    """(dK, dV) of one key block over the query tiles of the group's heads that see it."""
    BLOCK_D: tl.constexpr = HEAD[HEAD_BLOCK_D]
    BLOCK_DV: tl.constexpr = HEAD[HEAD_BLOCK_DV]
    Hq, group, Lq, Lk = sizes[0], sizes[1], sizes[2], sizes[3]
    pos_offset, window, saturation_lse = literals[0], literals[1], literals[5]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    t_lo, f_lo, f_hi, t_hi = query_tiles(n_block * BLOCK_N, tl.minimum(n_block * BLOCK_N + BLOCK_N, Lk) - 1, Lq,
                                         pos_offset, window, RULE[RULE_CAUSAL], RULE[RULE_WINDOWED], BLOCK_M)
    n_q_tiles = tl.cdiv(Lq, BLOCK_M)
    for g in range(group):
        head = kv_head * group + g
        Q_head = Q + batch * sq[0] + head * sq[1]
        dO_head = dOut + batch * sg[0] + head * sg[1]
        Stats_head = Stats + (batch * Hq + head) * Lq * 2
        Delta_head = Delta + (batch * Hq + head) * Lq
        mask_head = Mask + batch * sm[0] + head * sm[1]
        class_col = Classes + batch * sc[0] + head * sc[1] + (n_block * BLOCK_N // CELL) * sc[3]
        stream = (batch * Hq + head).to(tl.int32)
        if RULE[RULE_MASK_KIND] == 0:  # the masked edge before the fully visible run, the run, the masked edge after it
            for part in tl.static_range(3):
                lo = t_lo if part == 0 else (f_lo if part == 1 else f_hi)
                hi = f_lo if part == 0 else (f_hi if part == 1 else t_hi)
                for m in range(lo, hi):
                    dk, dv = dkdv_tile(dk, dv, k, v, m, k_idx, Q_head, dO_head, Stats_head, Delta_head, mask_head,
                                       stream, sq, sg, sm, sizes, literals, BLOCK_M, HEAD, part != 1, EXACT, RULE,
                                       False, NUMERICS)
            run_hi = f_lo
        else:  # the fully visible run together where its cells allow (tiles.py `open_run`)
            run_hi, plain = open_run(class_col, sc[2], f_lo, f_hi, BLOCK_M, CELL, RULE[RULE_MASK_KIND])
            for adds in tl.static_range(2 if RULE[RULE_MASK_KIND] == 2 else 1):
                if plain != (adds == 1):
                    for m in range(f_lo, run_hi):
                        dk, dv = dkdv_tile(dk, dv, k, v, m, k_idx, Q_head, dO_head, Stats_head, Delta_head,
                                           mask_head, stream, sq, sg, sm, sizes, literals, BLOCK_M, HEAD, False,
                                           EXACT, RULE, adds == 1, NUMERICS)
        # tiles chosen one by one: by the mask's classes (FULL unmasked, PARTIAL and OPEN masked), and in a flagged
        # head the skipped tiles holding rows that skipping would change (masked)
        flagged = False
        if CAN_SKIP:
            flagged = tl.load(HeadFlags + batch * Hq + head) != 0
        lo = tl.where(flagged, 0, t_lo)
        hi = tl.where(flagged, n_q_tiles, t_hi if RULE[RULE_MASK_KIND] != 0 else t_lo)
        for m in range(lo, hi):
            in_run = (m >= t_lo) & (m < t_hi)
            if RULE[RULE_MASK_KIND] != 0:
                cls = tl.load(class_col + (m * BLOCK_M // CELL) * sc[2])
                to_visit = in_run & ((m < f_lo) | (m >= run_hi))
                visit_full = to_visit & (cls == FULL)
                visit_masked = to_visit & (cls != FULL) & (cls != SKIP)
                skipped = ~in_run | (cls == SKIP)
            else:  # the run was visited above
                visit_full = False
                visit_masked = False
                skipped = ~in_run
            if flagged & skipped:
                visit_masked = tile_saturated(Stats_head, m, Lq, saturation_lse, BLOCK_M)
            for masked in tl.static_range(2):
                if visit_masked if masked else visit_full:
                    dk, dv = dkdv_tile(dk, dv, k, v, m, k_idx, Q_head, dO_head, Stats_head, Delta_head, mask_head,
                                       stream, sq, sg, sm, sizes, literals, BLOCK_M, HEAD, masked == 1, EXACT, RULE,
                                       False, NUMERICS)
    return dk, dv


@triton.jit
def dkdv_program(Q, K, V, Mask, Classes, dOut, Stats, Delta, HeadFlags, dK, dV, sq, sk, sv, sm, sc, sg, sdk, sdv, Hkv,
                 sizes, literals, n_block, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
                 CELL: tl.constexpr, RULE: tl.constexpr, CAN_SKIP: tl.constexpr, EXACT: tl.constexpr,
                 NUMERICS: tl.constexpr):
    """Store dK and dV of key block n_block (BLOCK_N keys, of batch × KV head program_id(1)); whether they are not
    finite."""
    Lk, D, Dv = sizes[3], sizes[4], sizes[5]
    batch = (tl.program_id(1) // Hkv).to(tl.int64)
    kv_head = (tl.program_id(1) % Hkv).to(tl.int64)
    k_idx = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_idx < Lk
    d = tl.arange(0, HEAD[HEAD_BLOCK_D])
    dvi = tl.arange(0, HEAD[HEAD_BLOCK_DV])
    k = load_tile(K + batch * sk[0] + kv_head * sk[1] + k_idx[:, None] * sk[2] + d[None, :] * sk[3], k_ok, d < D,
                  True, HEAD[HEAD_PAD_D])
    v = load_tile(V + batch * sv[0] + kv_head * sv[1] + k_idx[:, None] * sv[2] + dvi[None, :] * sv[3], k_ok,
                  dvi < Dv, True, HEAD[HEAD_PAD_DV])
    k = mma_operand(k, NUMERICS)
    v = mma_operand(v, NUMERICS)
    dk, dv = dkdv_block(k, v, k_idx, n_block, batch, kv_head, Q, Mask, Classes, dOut, Stats, Delta, HeadFlags, sq,
                        sm, sc, sg, sizes, literals, BLOCK_M, BLOCK_N, HEAD, CELL, RULE, CAN_SKIP, EXACT, NUMERICS)
    tl.store(dK + batch * sdk[0] + kv_head * sdk[1] + k_idx[:, None] * sdk[2] + d[None, :] * sdk[3],
             to_dtype(dk * literals[2], dK.dtype.element_ty), mask=k_ok[:, None] & (d < D)[None, :])
    tl.store(dV + batch * sdv[0] + kv_head * sdv[1] + k_idx[:, None] * sdv[2] + dvi[None, :] * sdv[3],
             to_dtype(dv, dV.dtype.element_ty), mask=k_ok[:, None] & (dvi < Dv)[None, :])
    return any_nonfinite(dk) | any_nonfinite(dv)


@triton.jit
def attention_dkdv_program(
        Q, K, V, Mask, Classes, Seed, dOut, Stats, Delta, HeadFlags, dK, dV, sq, sk, sv, sm, sc, sg, sdk, sdv, Hkv,
        sizes, literals, LQ_KEY, LK_KEY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
        CELL: tl.constexpr, RULE: tl.constexpr, CAN_SKIP: tl.constexpr, NUMERICS: tl.constexpr):
    """Grid (key blocks, batch × KV heads). A block whose dK or dV is not finite is redone by EXACT passes over
    its EXACT_BLOCK-key parts (a plain dot may have spread a NaN or ±inf from a position some row does not see)."""
    literals = kernel_literals(literals, Seed, RULE)
    nonfinite = dkdv_program(Q, K, V, Mask, Classes, dOut, Stats, Delta, HeadFlags, dK, dV, sq, sk, sv, sm, sc, sg,
                             sdk, sdv, Hkv, sizes, literals, tl.program_id(0), BLOCK_M, BLOCK_N, HEAD, CELL, RULE,
                             CAN_SKIP, False, NUMERICS)
    if CAN_SKIP:
        if nonfinite:
            for part in range(BLOCK_N // EXACT_BLOCK):
                dkdv_program(Q, K, V, Mask, Classes, dOut, Stats, Delta, HeadFlags, dK, dV, sq, sk, sv, sm, sc, sg,
                             sdk, sdv, Hkv, sizes, literals, tl.program_id(0) * (BLOCK_N // EXACT_BLOCK) + part,
                             EXACT_BLOCK, EXACT_BLOCK, HEAD, CELL, RULE, CAN_SKIP, True, NUMERICS)


@triton.jit
def dq_tile(dq, q, do, row_stats, n, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm, sizes, literals,
            BLOCK_N: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
            RULE: tl.constexpr, ADD_OPEN: tl.constexpr, MASK_GRAD: tl.constexpr, NUMERICS: tl.constexpr):
    """One key tile's share of dQ: dS = p (dP − Δ), dQ += dS K (scale applied at the end);
    row_stats = (shift, log2_sum, Δ) and rows = (q_idx, q_ok, stream, dmask_row_ptrs) of the program's rows, q_open
    those every position reaches. With EXACT each product is formed only where the row reaches the key (tiles.py).
    With MASK_GRAD, dS where it passes (the gradient of the score the float mask is added to, after the softcap)
    is stored at dmask_row_ptrs (rows of Lk float32): elementwise, so exact in plain passes too."""
    shift, log2_sum, delta = row_stats
    q_idx, q_ok, stream, dmask_row_ptrs = rows
    Lk, D, Dv = sizes[3], sizes[4], sizes[5]
    dropout_p, seed = literals[6], literals[7]
    k_idx = n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_idx < Lk
    d = tl.arange(0, HEAD[HEAD_BLOCK_D])
    dvi = tl.arange(0, HEAD[HEAD_BLOCK_DV])
    k = mma_operand(load_tile(k_base + k_idx[:, None] * sk[2] + d[None, :] * sk[3], k_ok, d < D, MASKED,
                              HEAD[HEAD_PAD_D]),
                    NUMERICS)
    v = mma_operand(load_tile(v_base + k_idx[:, None] * sv[2] + dvi[None, :] * sv[3], k_ok, dvi < Dv, MASKED,
                              HEAD[HEAD_PAD_DV]), NUMERICS)
    qk = tl.dot(q, tl.trans(k), input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
    scores, reach, passes, softcap_grad = tile_scores(qk, q_idx[:, None], q_open[:, None], q_ok[:, None],
                                                      k_idx[None, :], mask_row_ptrs[:, None] + k_idx[None, :] * sm[3],
                                                      Lk, literals, MASKED, EXACT, RULE, ADD_OPEN)
    p = probabilities(scores, reach, shift[:, None], log2_sum[:, None], MASKED, EXACT)
    dp = tl.dot(do, tl.trans(v), input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
    if RULE[RULE_DROPOUT]:
        undropped = dropout_keep(seed, stream[:, None], q_idx[:, None], k_idx[None, :], dropout_p)
        dp = tl.where(undropped, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if MASK_GRAD:
        ds_scores = ds
        if MASKED:
            ds_scores = tl.where(passes, ds, 0.0)
        tl.store(dmask_row_ptrs[:, None] + k_idx[None, :], ds_scores, mask=q_ok[:, None] & k_ok[None, :])
    if RULE[RULE_SOFTCAP]:
        ds = ds * softcap_grad
    if MASKED:
        ds = tl.where(passes, ds, 0.0)
    return selected_dot(mma_operand(to_dtype(ds, k_base.dtype.element_ty), NUMERICS), k, passes, dq,
                        MASKED and EXACT, NUMERICS)


@triton.jit
def dq_tiles(dq, q, do, row_stats, lo, hi, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm, sizes, literals,
             BLOCK_N: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
             RULE: tl.constexpr, ADD_OPEN: tl.constexpr, MASK_GRAD: tl.constexpr, NUMERICS: tl.constexpr):
    """Key tiles [lo, hi), all masked or all unmasked, into dQ."""
    for n in range(lo, hi):
        dq = dq_tile(dq, q, do, row_stats, n, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm, sizes,
                     literals, BLOCK_N, HEAD, MASKED, EXACT, RULE, ADD_OPEN, MASK_GRAD, NUMERICS)
    return dq


@triton.jit
def dq_rows(q, do, row_stats, tiles, respect_classes, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm,
            class_row, sc, sizes, literals, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
            CELL: tl.constexpr, RULE: tl.constexpr, EXACT: tl.constexpr, MASK_GRAD: tl.constexpr,
            NUMERICS: tl.constexpr):
    """dQ of the program's rows over key tiles tiles = (t_lo, f_lo, f_hi, t_hi) (see attend_rows)."""
    BLOCK_D: tl.constexpr = HEAD[HEAD_BLOCK_D]
    t_lo, f_lo, f_hi, t_hi = tiles
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if RULE[RULE_MASK_KIND] != 0:  # the fully visible run together where its cells allow, the others one by one
        run_end = f_lo  # (see attend_rows); not with MASK_GRAD, whose store inside the tiles would take its address
        if respect_classes and not MASK_GRAD:  # from the class map: Inductor's analysis would count it as written
            run_end, plain = open_run(class_row, sc[3], f_lo, f_hi, BLOCK_N, CELL, RULE[RULE_MASK_KIND])
            for adds in tl.static_range(2 if RULE[RULE_MASK_KIND] == 2 else 1):
                if plain != (adds == 1):
                    dq = dq_tiles(dq, q, do, row_stats, f_lo, run_end, k_base, v_base, sk, sv, rows, q_open,
                                  mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, False, EXACT, RULE, adds == 1,
                                  MASK_GRAD, NUMERICS)
        for n in range(t_lo, t_hi):  # (the store's address follows the loop alone: see above)
            cls = tl.load(class_row + (n * BLOCK_N // CELL) * sc[3], mask=respect_classes, other=PARTIAL)
            if (cls != SKIP) & ((n < f_lo) | (n >= run_end)):
                if cls == FULL:
                    dq = dq_tile(dq, q, do, row_stats, n, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm,
                                 sizes, literals, BLOCK_N, HEAD, False, EXACT, RULE, False, MASK_GRAD, NUMERICS)
                else:
                    dq = dq_tile(dq, q, do, row_stats, n, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm,
                                 sizes, literals, BLOCK_N, HEAD, True, EXACT, RULE, False, MASK_GRAD, NUMERICS)
    else:  # masked edges around the fully visible run, like the forward
        for part in tl.static_range(3):
            lo = t_lo if part == 0 else (f_lo if part == 1 else f_hi)
            hi = f_lo if part == 0 else (f_hi if part == 1 else t_hi)
            dq = dq_tiles(dq, q, do, row_stats, lo, hi, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm,
                          sizes, literals, BLOCK_N, HEAD, part != 1, EXACT, RULE, False, MASK_GRAD, NUMERICS)
    return dq


@triton.jit
def dq_program(Q, K, V, Mask, Classes, dOut, Stats, Delta, dQ, dMask, sq, sk, sv, sm, sc, sg, sdq, sizes, literals,
               m_block, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, CELL: tl.constexpr,
               RULE: tl.constexpr, CAN_SKIP: tl.constexpr, EXACT: tl.constexpr, MASK_GRAD: tl.constexpr,
               NUMERICS: tl.constexpr):
    """Store dQ of query block m_block (BLOCK_M rows, of batch × query head program_id(1)); whether it is not finite.
    A block with rows that skipping would change visits every key tile with full masking. An EXACT pass clears
    its rows of dMask first: the plain pass may have stored there, in tiles it visits and this one skips."""
    Hq, group, Lq, Lk, D, Dv = sizes
    pos_offset, window, saturation_lse = literals[0], literals[1], literals[5]
    batch = (tl.program_id(1) // Hq).to(tl.int64)
    head = (tl.program_id(1) % Hq).to(tl.int64)
    kv_head = head // group
    q_idx = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_idx < Lq
    d = tl.arange(0, HEAD[HEAD_BLOCK_D])
    dvi = tl.arange(0, HEAD[HEAD_BLOCK_DV])
    q = mma_operand(load_tile(Q + batch * sq[0] + head * sq[1] + q_idx[:, None] * sq[2] + d[None, :] * sq[3], q_ok,
                              d < D, True, HEAD[HEAD_PAD_D]), NUMERICS)
    do = mma_operand(load_tile(dOut + batch * sg[0] + head * sg[1] + q_idx[:, None] * sg[2] + dvi[None, :] * sg[3],
                               q_ok, dvi < Dv, True, HEAD[HEAD_PAD_DV]), NUMERICS)
    stats = Stats + ((batch * Hq + head) * Lq + q_idx) * 2
    shift = tl.load(stats, mask=q_ok, other=0.0)
    log2_sum = tl.load(stats + 1, mask=q_ok, other=0.0)
    row_stats = (shift, log2_sum, tl.load(Delta + (batch * Hq + head) * Lq + q_idx, mask=q_ok, other=0.0))
    k_base = K + batch * sk[0] + kv_head * sk[1]
    v_base = V + batch * sv[0] + kv_head * sv[1]
    mask_row_ptrs = Mask + batch * sm[0] + head * sm[1] + q_idx.to(tl.int64) * sm[2]
    class_row = Classes + batch * sc[0] + head * sc[1] + (m_block * BLOCK_M // CELL) * sc[2]
    dmask_row_ptrs = dMask + ((batch * Hq + head) * Lq + q_idx) * Lk
    if MASK_GRAD and EXACT:
        for n in range(tl.cdiv(Lk, BLOCK_N)):
            k_idx = n * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(dmask_row_ptrs[:, None] + k_idx[None, :], tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                     mask=q_ok[:, None] & (k_idx < Lk)[None, :])
    rows = (q_idx, q_ok, (batch * Hq + head).to(tl.int32) + q_idx * 0, dmask_row_ptrs)
    q_open = open_rows(shift + log2_sum, q_ok, saturation_lse)
    q_pos_lo = m_block * BLOCK_M + pos_offset
    q_pos_hi = tl.minimum(m_block * BLOCK_M + BLOCK_M, Lq) - 1 + pos_offset
    t_lo, f_lo, f_hi, t_hi = key_tiles(q_pos_lo, q_pos_hi, Lk, window, RULE[RULE_CAUSAL], RULE[RULE_WINDOWED], BLOCK_N)
    respect_classes = t_lo == t_lo
    if CAN_SKIP:
        saturated = rows_saturated(shift + log2_sum, q_ok, saturation_lse)
        respect_classes = ~saturated
        t_lo = tl.where(saturated, 0, t_lo)
        f_lo = tl.where(saturated, 0, f_lo)
        f_hi = tl.where(saturated, 0, f_hi)
        t_hi = tl.where(saturated, tl.cdiv(Lk, BLOCK_N), t_hi)
    dq = dq_rows(q, do, row_stats, (t_lo, f_lo, f_hi, t_hi), respect_classes, k_base, v_base, sk, sv, rows, q_open,
                 mask_row_ptrs, sm, class_row, sc, sizes, literals, BLOCK_M, BLOCK_N, HEAD, CELL, RULE, EXACT,
                 MASK_GRAD, NUMERICS)
    tl.store(dQ + batch * sdq[0] + head * sdq[1] + q_idx[:, None] * sdq[2] + d[None, :] * sdq[3],
             to_dtype(dq * literals[2], dQ.dtype.element_ty), mask=q_ok[:, None] & (d < D)[None, :])
    return any_nonfinite(dq)


@triton.jit
def attention_dq_program(
        Q, K, V, Mask, Classes, Seed, dOut, Stats, Delta, dQ, dMask, sq, sk, sv, sm, sc, sg, sdq, sizes, literals,
        LQ_KEY, LK_KEY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, CELL: tl.constexpr,
        RULE: tl.constexpr, CAN_SKIP: tl.constexpr, MASK_GRAD: tl.constexpr, NUMERICS: tl.constexpr):
    """Grid (query blocks, batch × query heads). A block whose dQ is not finite is redone by EXACT passes over its
    EXACT_BLOCK-row parts. With MASK_GRAD (a float mask that takes a gradient), dS into dMask: contiguous
    [B, Hq, Lq, Lk] float32, zero where the program visits no tile (empty without MASK_GRAD)."""
    literals = kernel_literals(literals, Seed, RULE)
    m_block = tl.program_id(0)
    if RULE[RULE_CAUSAL]:  # the longest rows first
        m_block = tl.num_programs(0) - 1 - m_block
    nonfinite = dq_program(Q, K, V, Mask, Classes, dOut, Stats, Delta, dQ, dMask, sq, sk, sv, sm, sc, sg, sdq, sizes,
                           literals, m_block, BLOCK_M, BLOCK_N, HEAD, CELL, RULE, CAN_SKIP, False, MASK_GRAD,
                           NUMERICS)
    if CAN_SKIP:
        if nonfinite:
            for part in range(BLOCK_M // EXACT_BLOCK):
                dq_program(Q, K, V, Mask, Classes, dOut, Stats, Delta, dQ, dMask, sq, sk, sv, sm, sc, sg, sdq, sizes,
                           literals, m_block * (BLOCK_M // EXACT_BLOCK) + part, EXACT_BLOCK, EXACT_BLOCK, HEAD, CELL,
                           RULE, CAN_SKIP, True, MASK_GRAD, NUMERICS)


def _prune_backward_configs(configs, named_args, key_blocks: bool, **kwargs):
    """Keep configs that fit shared memory (one block resident, the other side's tiles pipelined)
    and registers: dK/dV (key_blocks) or dQ accumulators plus four [rows, keys] float32 temporaries."""
    block_d, block_dv = HeadBlocks(*kwargs["HEAD"])[:2]
    element = named_args["Q"].element_size()
    kept = []
    for config in configs:
        m, n, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
        resident, streamed = (n, m) if key_blocks else (m, n)
        shared = element * (resident + config.num_stages * streamed) * (block_d + block_dv)
        accumulators = n * (block_d + block_dv) if key_blocks else m * block_d
        if shared <= 200 * 1024 and registers_fit(accumulators, 4 * m * n, warps):
            kept.append(config)
    kept = kept or configs[-1:]
    return kept if tuning_pays(named_args["LQ_KEY"], named_args["LK_KEY"]) else kept[:1]


def _configs(shapes):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_BACKWARD_KEY = ["LQ_KEY", "LK_KEY", "HEAD", "RULE"]
_TUPLES = {"sq": 4, "sk": 4, "sv": 4, "sm": 4, "sc": 4, "sg": 4, "sizes": 6, "literals": 7}
# (query rows, key rows, warps, stages) per program
attention_dkdv_kernel = autotune(
    _configs([(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2),
              (16, 64, 8, 2), (16, 32, 4, 2)]),
    key=_BACKWARD_KEY,
    prune_configs_by={"early_config_prune": functools.partial(_prune_backward_configs, key_blocks=True)})(
    flat_kernel(attention_dkdv_program, "_attention_dkdv_kernel", {**_TUPLES, "sdk": 4, "sdv": 4}))
attention_dq_kernel = autotune(
    _configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]),
    key=_BACKWARD_KEY,
    prune_configs_by={"early_config_prune": functools.partial(_prune_backward_configs, key_blocks=False)})(
    flat_kernel(attention_dq_program, "_attention_dq_kernel", {**_TUPLES, "sdq": 4}))
backward_preprocess_kernel = flat_kernel(backward_preprocess_program, "_backward_preprocess_kernel",
                                         {"so": 4, "sg": 4})
