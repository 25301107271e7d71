"""Forward: tiled flash attention, one pass over K/V per block of query rows.

Each program holds BLOCK_M query rows in registers and walks the key tiles that may be
visible to them, with an online softmax in float32 on exp2 (scale·log2 e folded into one
multiply). Tiles fully visible run without any masking; tiles on a causal diagonal, a window
edge, the end of the keys or a PARTIAL mask cell apply masks elementwise (a fully visible run of
OPEN cells, a bias, only adds it); SKIP tiles are not read. Rows that skipping could change (see
tiles.py) are recomputed in the same program without skipping, which keeps fully masked rows
exactly as the naive formula gives them.

GQA: a query head reads KV head h // group through strides, K/V are never repeated. For short
query blocks (decode), the group's query heads are packed into the rows of one program
(PACK_GQA), so K/V are read once per KV head. When there are too few programs to fill the GPU,
the keys are split across programs (flash-decoding); a second kernel merges their partial
softmaxes (and does the exact recompute for rows that need it). Results that are not finite are
redone by an EXACT pass (tiles.py: the NaN rule). Sinks: a row's sink logit starts its online
softmax (max = sink, sum = 1, no value); with splits, the first split holds it.

Grouped arguments (strides, sizes, literals; HEAD, RULE, NUMERICS) are laid out in tiles.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..language import to_dtype
from ..runtime import autotune, flat_kernel, interpreting
from .tiles import (EXACT_BLOCK, FULL, HEAD_BLOCK_D, HEAD_BLOCK_DV, HEAD_PAD_D, HEAD_PAD_DV, LOG2E,
                    NUMERICS_DOT_PRECISION, PARTIAL, RULE_CAUSAL, RULE_DROPOUT, RULE_MASK_KIND, RULE_SINKS, RULE_SOFTCAP,
                    RULE_WINDOWED, SKIP, any_nonfinite, dropout_keep, kernel_literals, key_tiles, load_tile,
                    mma_operand, open_rows, open_run, rows_saturated, selected_dot, tile_scores)


@triton.jit
def query_rows(m_block, bh, heads_in_grid, group, Lq, BLOCK_M: tl.constexpr, PACK_GQA: tl.constexpr):
    """Batch, per-row query head and index, row validity and the KV head of one program's rows.

    Packed, rows run over (head in group, query index); otherwise over the query index.
    """
    batch = bh // heads_in_grid
    grid_head = bh % heads_in_grid
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        q_head = grid_head * group + rows // Lq
        q_idx = rows % Lq
        q_ok = rows < group * Lq
        kv_head = grid_head
    else:
        q_head = grid_head + rows * 0
        q_idx = rows
        q_ok = rows < Lq
        kv_head = grid_head // group
    return batch, grid_head, q_head, q_idx, q_ok, kv_head


@triton.jit
def attend_tile(acc, m_i, l_i, q, n, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm, sizes, literals,
                BLOCK_N: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
                RULE: tl.constexpr, ADD_OPEN: tl.constexpr, NUMERICS: tl.constexpr):
    """One key tile into the running (acc, max, sum) of the online softmax; rows = (q_idx, q_ok, stream),
    q_open the rows every position reaches. With EXACT, unreached positions weigh exactly nothing and form no
    product (tiles.py); ADD_OPEN: an unmasked tile of OPEN cells, the float mask added (tile_scores)."""
    q_idx, q_ok, stream = rows
    Lk, D, Dv = sizes[3], sizes[4], sizes[5]
    scale, dropout_p, seed = literals[2], literals[6], literals[7]
    k_idx = n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD[HEAD_BLOCK_D])
    dv = tl.arange(0, HEAD[HEAD_BLOCK_DV])
    k_ok = k_idx < Lk
    k = load_tile(k_base + k_idx[:, None] * sk[2] + d[None, :] * sk[3], k_ok, d < D, MASKED, HEAD[HEAD_PAD_D])
    qk = tl.dot(q, tl.trans(mma_operand(k, NUMERICS)), input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
    reach = True
    if MASKED or RULE[RULE_SOFTCAP] or ADD_OPEN:
        scores, reach, _, _ = tile_scores(qk, q_idx[:, None], q_open[:, None], q_ok[:, None], k_idx[None, :],
                                          mask_row_ptrs[:, None] + k_idx[None, :] * sm[3], Lk, literals, MASKED,
                                          EXACT, RULE, ADD_OPEN)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if MASKED:  # a row may have seen only −inf so far
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(scores - m_use[:, None])
    else:  # scale > 0 is required, so max(qk)·c is the max of the scaled scores
        m_new = tl.maximum(m_i, tl.max(qk, 1) * (scale * LOG2E))
        m_use = m_new
        p = tl.exp2(qk * (scale * LOG2E) - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if RULE[RULE_DROPOUT]:
        undropped = dropout_keep(seed, stream[:, None], q_idx[:, None], k_idx[None, :], dropout_p)
        p = tl.where(undropped, p * (1.0 / (1.0 - dropout_p)), 0.0)
    v = load_tile(v_base + k_idx[:, None] * sv[2] + dv[None, :] * sv[3], k_ok, dv < Dv, MASKED, HEAD[HEAD_PAD_DV])
    acc = selected_dot(mma_operand(to_dtype(p, v.dtype), NUMERICS), mma_operand(v, NUMERICS), reach,
                       acc * alpha[:, None], MASKED and EXACT, NUMERICS)
    return acc, m_new, l_i


@triton.jit
def attend_tiles(acc, m_i, l_i, q, lo, hi, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm, sizes, literals,
                 BLOCK_N: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
                 RULE: tl.constexpr, ADD_OPEN: tl.constexpr, NUMERICS: tl.constexpr):
    """Key tiles [lo, hi), all masked or all unmasked, into the running (acc, max, sum)."""
    for n in range(lo, hi):
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, n, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm,
                                    sizes, literals, BLOCK_N, HEAD, MASKED, EXACT, RULE, ADD_OPEN, NUMERICS)
    return acc, m_i, l_i


@triton.jit
def attend_rows(q, tiles, k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm, class_ptr, sc, sizes, literals,
                Sinks, with_sinks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, CELL: tl.constexpr,
                EVERY_TILE: tl.constexpr, EXACT: tl.constexpr, RULE: tl.constexpr, USE_CLASSES: tl.constexpr,
                NUMERICS: tl.constexpr):
    """(acc, max, sum) of the rows over key tiles tiles = (t_lo, f_lo, f_hi, t_hi): all of [t_lo, t_hi),
    of which [f_lo, f_hi) are known fully visible.

    With a mask tensor, the fully visible run goes together where its cells allow (tiles.py `open_run`), the
    other tiles one by one by their class; with EVERY_TILE (tiles (0, 0, 0, all)) every tile masked.
    EXACT passes (EVERY_TILE too) follow the NaN rule for the rows q_open says are open (tiles.py).
    """
    BLOCK_DV: tl.constexpr = HEAD[HEAD_BLOCK_DV]
    t_lo, f_lo, f_hi, t_hi = tiles
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if RULE[RULE_SINKS]:  # the row's sink (log2 units) starts the running max and sum: a score with no value
        sink = tl.load(Sinks + rows[2] % sizes[0], mask=rows[1], other=0.0).to(tl.float32) * LOG2E
        m_i = tl.where(with_sinks, sink, m_i)
        l_i = tl.where(with_sinks & (sink > float("-inf")), 1.0, l_i)
    if RULE[RULE_MASK_KIND] != 0:
        run_end = f_lo  # the fully visible run's share [f_lo, run_end) that goes together
        if USE_CLASSES and not EVERY_TILE:
            run_end, plain = open_run(class_ptr, sc[3], f_lo, f_hi, BLOCK_N, CELL, RULE[RULE_MASK_KIND])
            for adds in tl.static_range(2 if RULE[RULE_MASK_KIND] == 2 else 1):
                if plain != (adds == 1):
                    acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, f_lo, run_end, k_base, v_base, sk, sv, rows, q_open,
                                                 mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, False, EXACT, RULE,
                                                 adds == 1, NUMERICS)
        for n in range(t_lo, t_hi):  # the other tiles
            if USE_CLASSES and not EVERY_TILE:
                cls = tl.load(class_ptr + (n * BLOCK_N // CELL) * sc[3])
            else:
                cls = PARTIAL
            if (cls != SKIP) & ((n < f_lo) | (n >= run_end)):
                if cls == FULL:
                    acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, n, k_base, v_base, sk, sv, rows, q_open,
                                                mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, False, EXACT,
                                                RULE, False, NUMERICS)
                else:
                    acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, n, k_base, v_base, sk, sv, rows, q_open,
                                                mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, True, EXACT,
                                                RULE, False, NUMERICS)
    else:  # masked edges before and after the fully visible run (a causal diagonal, a window's edge, the end)
        acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, t_lo, f_lo, k_base, v_base, sk, sv, rows, q_open,
                                     mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, True, EXACT, RULE, False,
                                     NUMERICS)
        acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, f_lo, f_hi, k_base, v_base, sk, sv, rows, q_open,
                                     mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, False, EXACT, RULE, False,
                                     NUMERICS)
        acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, f_hi, t_hi, k_base, v_base, sk, sv, rows, q_open,
                                     mask_row_ptrs, sm, sizes, literals, BLOCK_N, HEAD, True, EXACT, RULE, False,
                                     NUMERICS)
    return acc, m_i, l_i


@triton.jit
def attend_program_rows(Q, K, V, Mask, Classes, Sinks, m_block, query, exact, known_lse, split, num_splits, sq, sk,
                        sv, sm, sc, sizes, literals, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD: tl.constexpr, CELL: tl.constexpr, RULE: tl.constexpr, USE_CLASSES: tl.constexpr,
                        CAN_SKIP: tl.constexpr, NUMERICS: tl.constexpr):
    """Attention of one block of rows, `query` (what `query_rows` gives): (acc, max, sum).

    The caller finds the rows (from program ids and sizes only) and stores through them: a store pointer built
    from values this function returned would reach, in Inductor's mutation analysis of the traced launch
    (triton_kernel_wrap: a store's pointer traced back through calls), every pointer given here, and every
    input would count as written (each call cloning q, k, v and a KV cache; CUDA-graph trees skipped for a
    "mutated input").

    `exact` visits every key tile without skipping (the merge's recompute; known_lse: the rows' log-sum-exp over
    the splits); otherwise the rows' visible tiles (their `split`-th share), then every tile again when skipping
    may have changed a row (not when split: the merge decides). A result that is not finite is redone by an
    EXACT pass (tiles.py), whose open rows the log-sum-exp of the pass before says.
    """
    Hq, Lq, Lk, D = sizes[0], sizes[2], sizes[3], sizes[4]
    pos_offset, window, saturation_lse = literals[0], literals[1], literals[5]
    batch, grid_head, q_head, q_idx, q_ok, kv_head = query
    batch = batch.to(tl.int64)
    d = tl.arange(0, HEAD[HEAD_BLOCK_D])
    q_rows = Q + batch * sq[0] + q_head.to(tl.int64) * sq[1] + q_idx.to(tl.int64) * sq[2]
    q = mma_operand(load_tile(q_rows[:, None] + d[None, :] * sq[3], q_ok, d < D, True, HEAD[HEAD_PAD_D]), NUMERICS)
    k_base = K + batch * sk[0] + kv_head.to(tl.int64) * sk[1]
    v_base = V + batch * sv[0] + kv_head.to(tl.int64) * sv[1]
    mask_row_ptrs = Mask + batch * sm[0] + q_head.to(tl.int64) * sm[1] + q_idx.to(tl.int64) * sm[2]
    class_ptr = Classes + batch * sc[0] + grid_head * sc[1] + (m_block * BLOCK_M // CELL) * sc[2]
    rows = (q_idx, q_ok, batch.to(tl.int32) * Hq + q_head)
    n_tiles = tl.cdiv(Lk, BLOCK_N)
    q_open = q_ok & False
    if exact:
        acc, m_i, l_i = attend_rows(q, (0, 0, 0, n_tiles), k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs, sm,
                                    class_ptr, sc, sizes, literals, Sinks, True, BLOCK_M, BLOCK_N, HEAD, CELL, True,
                                    False, RULE, USE_CLASSES, NUMERICS)
        lse = known_lse
    else:
        q_pos_lo = tl.min(tl.where(q_ok, q_idx, Lq), 0) + pos_offset
        q_pos_hi = tl.max(tl.where(q_ok, q_idx, 0), 0) + pos_offset
        t_lo, f_lo, f_hi, t_hi = key_tiles(q_pos_lo, q_pos_hi, Lk, window, RULE[RULE_CAUSAL], RULE[RULE_WINDOWED],
                                           BLOCK_N)
        share = tl.cdiv(t_hi - t_lo, num_splits)
        s_lo = tl.minimum(t_lo + split * share, t_hi)
        s_hi = tl.minimum(s_lo + share, t_hi)
        t_lo, t_hi = s_lo, s_hi
        f_lo = tl.minimum(tl.maximum(f_lo, t_lo), t_hi)
        f_hi = tl.minimum(tl.maximum(f_hi, f_lo), t_hi)
        acc, m_i, l_i = attend_rows(q, (t_lo, f_lo, f_hi, t_hi), k_base, v_base, sk, sv, rows, q_open, mask_row_ptrs,
                                    sm, class_ptr, sc, sizes, literals, Sinks, split == 0, BLOCK_M, BLOCK_N, HEAD,
                                    CELL, False, False, RULE, USE_CLASSES, NUMERICS)  # the first split has the sinks
        lse = m_i + tl.log2(l_i)
        if CAN_SKIP:
            if num_splits == 1:
                if rows_saturated(lse, q_ok, saturation_lse):  # skipping may have changed a row
                    acc, m_i, l_i = attend_rows(q, (0, 0, 0, n_tiles), k_base, v_base, sk, sv, rows, q_open,
                                                mask_row_ptrs, sm, class_ptr, sc, sizes, literals, Sinks, True,
                                                BLOCK_M, BLOCK_N, HEAD, CELL, True, False, RULE, USE_CLASSES, NUMERICS)
                    lse = m_i + tl.log2(l_i)
    if CAN_SKIP:
        if num_splits == 1:  # (the merge's recompute is one split)
            if any_nonfinite(acc):  # a plain dot may have spread a NaN or ±inf from a position some row cannot see
                q_open = open_rows(lse, q_ok, saturation_lse)
                acc, m_i, l_i = attend_rows(q, (0, 0, 0, tl.cdiv(Lk, EXACT_BLOCK)), k_base, v_base, sk, sv, rows,
                                            q_open, mask_row_ptrs, sm, class_ptr, sc, sizes, literals, Sinks, True,
                                            BLOCK_M, EXACT_BLOCK, HEAD, CELL, True, True, RULE, USE_CLASSES, NUMERICS)
                m_i = tl.where((l_i == 0) & ~q_open, float("nan"), m_i)  # reaches nothing: no gradient either
    return acc, m_i, l_i


@triton.jit
def finished_rows(acc, m_i, l_i, ZERO_EMPTY_ROWS: tl.constexpr):
    """(output rows, shift, log2 sum) from the online softmax's (acc, max, sum). A row that saw only −inf
    has sum 0: NaN as in the formula, or with ZERO_EMPTY_ROWS zeros and a log-sum-exp of +inf (SDPA)."""
    out = acc / l_i[:, None]
    log2_sum = tl.log2(l_i)
    if ZERO_EMPTY_ROWS:
        empty = l_i == 0
        out = tl.where(empty[:, None], 0.0, out)
        m_i = tl.where(empty, float("inf"), m_i)
        log2_sum = tl.where(empty, 0.0, log2_sum)
    return out, m_i, log2_sum


@triton.jit
def store_rows(Out, Stats, batch, q_head, q_idx, q_ok, out, shift, log2_sum, so, ss, Dv, BLOCK_DV: tl.constexpr):
    """Write a block of output rows (rounded to Out's dtype) and their softmax statistics; so and ss are
    the [B, H, L, Dv] and [B, H, L] strides.

    The log-sum-exp of a row is kept as two floats, shift + log2(sum): for a fully masked row with a
    finfo.min fill the shift is ≈ −FLT_MAX, and their float32 sum would lose the log2(sum) part.
    """
    dv = tl.arange(0, BLOCK_DV)
    rows = batch * so[0] + q_head.to(tl.int64) * so[1] + q_idx.to(tl.int64) * so[2]
    tl.store(Out + rows[:, None] + dv[None, :] * so[3], to_dtype(out, Out.dtype.element_ty),
             mask=q_ok[:, None] & (dv < Dv)[None, :])
    stats = Stats + batch * ss[0] + q_head.to(tl.int64) * ss[1] + q_idx.to(tl.int64) * ss[2]
    tl.store(stats, shift, mask=q_ok)
    tl.store(stats + 1, log2_sum, mask=q_ok)


@triton.jit
def attention_forward_program(
        Q, K, V, Mask, Classes, Seed, Sinks, Out, Stats, sq, sk, sv, sm, sc, so, ss, heads_in_grid, sizes, literals,
        ROWS_KEY, LK_KEY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr, CELL: tl.constexpr,
        RULE: tl.constexpr, USE_CLASSES: tl.constexpr, PACK_GQA: tl.constexpr, CAN_SKIP: tl.constexpr,
        ZERO_EMPTY_ROWS: tl.constexpr, NUMERICS: tl.constexpr):
    """Grid (row blocks, batch × heads in grid, splits). so / ss lead with the split stride: with splits,
    Out/Stats are the float32 partial buffers (normalized partial output, 0 where a split saw nothing, and
    its statistics)."""
    literals = kernel_literals(literals, Seed, RULE)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    m_block = tl.program_id(0)
    if RULE[RULE_CAUSAL]:  # the longest rows first: fewer idle multiprocessors at the end
        m_block = tl.num_programs(0) - 1 - m_block
    unknown_lse = tl.zeros([BLOCK_M], dtype=tl.float32)  # the first pass finds it
    query = query_rows(m_block, tl.program_id(1), heads_in_grid, sizes[1], sizes[2], BLOCK_M, PACK_GQA)
    batch, _, q_head, q_idx, q_ok, _ = query
    acc, m_i, l_i = attend_program_rows(
        Q, K, V, Mask, Classes, Sinks, m_block, query, False, unknown_lse, split, num_splits, sq, sk, sv, sm, sc,
        sizes, literals, BLOCK_M, BLOCK_N, HEAD, CELL, RULE, USE_CLASSES, CAN_SKIP, NUMERICS)
    batch = batch.to(tl.int64)
    if num_splits > 1:  # the merge finishes the rows
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        shift = m_i
        log2_sum = tl.log2(l_i)
    else:
        out, shift, log2_sum = finished_rows(acc, m_i, l_i, ZERO_EMPTY_ROWS)
    store_rows(Out + split * so[0], Stats + split * ss[0], batch, q_head, q_idx, q_ok, out, shift, log2_sum,
               (so[1], so[2], so[3], so[4]), (ss[1], ss[2], ss[3]), sizes[5], HEAD[HEAD_BLOCK_DV])


@triton.jit
def merge_splits_program(
        Q, K, V, Mask, Classes, Seed, Sinks, Out, Stats, PartOut, PartStats, sq, sk, sv, sm, sc, so, ss, sp, st,
        num_splits, heads_in_grid, sizes, literals, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
        CELL: tl.constexpr, RULE: tl.constexpr, PACK_GQA: tl.constexpr, ZERO_EMPTY_ROWS: tl.constexpr,
        NUMERICS: tl.constexpr):
    """Merge the splits' partial softmaxes (sp / st: their strides, split first); rows that skipping may
    have changed, or a result that is not finite, are recomputed by an exact pass."""
    BLOCK_DV: tl.constexpr = HEAD[HEAD_BLOCK_DV]
    literals = kernel_literals(literals, Seed, RULE)
    group, Lq, Dv = sizes[1], sizes[2], sizes[5]
    query = query_rows(tl.program_id(0), tl.program_id(1), heads_in_grid, group, Lq, BLOCK_M, PACK_GQA)
    batch, _, q_head, q_idx, q_ok, _ = query
    batch = batch.to(tl.int64)
    dv = tl.arange(0, HEAD[HEAD_BLOCK_DV])
    part_rows = batch * sp[1] + q_head.to(tl.int64) * sp[2] + q_idx.to(tl.int64) * sp[3]
    stat_rows = PartStats + batch * st[1] + q_head.to(tl.int64) * st[2] + q_idx.to(tl.int64) * st[3]
    lse = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.maximum(lse, tl.load(stat_rows + s * st[0], mask=q_ok, other=0.0)
                         + tl.load(stat_rows + s * st[0] + 1, mask=q_ok, other=0.0))
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(num_splits):
        weight = tl.exp2(tl.load(stat_rows + s * st[0], mask=q_ok, other=0.0)
                         + tl.load(stat_rows + s * st[0] + 1, mask=q_ok, other=0.0) - lse)
        part = tl.load(PartOut + s * sp[0] + part_rows[:, None] + dv[None, :] * sp[4],
                       mask=q_ok[:, None] & (dv < Dv)[None, :], other=0.0)
        acc += weight[:, None] * part
        total += weight
    out = acc / total[:, None]
    shift = lse
    log2_sum = tl.log2(total)
    if rows_saturated(lse, q_ok, literals[5]) | any_nonfinite(out):  # as attend_program_rows' exact pass
        acc, m_i, l_i = attend_program_rows(
            Q, K, V, Mask, Classes, Sinks, tl.program_id(0), query, True, lse, 0, 1, sq, sk, sv, sm, sc, sizes,
            literals, BLOCK_M, BLOCK_N, HEAD, CELL, RULE, False, True, NUMERICS)
        out, shift, log2_sum = finished_rows(acc, m_i, l_i, ZERO_EMPTY_ROWS)
    store_rows(Out, Stats, batch, q_head, q_idx, q_ok, out, shift, log2_sum, so, ss, Dv, HEAD[HEAD_BLOCK_DV])


def _forward_configs():
    """Hopper candidates (block rows × keys, warps, pipeline depth); one small fixed config when interpreting."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    shapes = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
              (64, 32, 4, 2), (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def registers_fit(accumulators: int, temporaries: int, warps: int) -> bool:
    """Float32 values per thread held across a tile (accumulators) plus its [rows, keys] temporaries:
    over 192 the kernels spill on Hopper (ptxas reports, triton 3.9, sm_90a)."""
    return (accumulators + temporaries) / (32 * warps) <= 192


def tuning_pays(rows_key: int, lk_key: int) -> bool:
    """Tiny problems (at most 2^14 scores per head: tests, toy models, short prompts) run the first
    candidate that fits: each candidate costs seconds of compiling and they all take microseconds. A key of 0
    (a symbolic size, plan.tuning_bucket) may be large: tuned (by Inductor, on its first call)."""
    return rows_key * lk_key > 2**14 or 0 in (rows_key, lk_key)


def _prune_forward_configs(configs, named_args, **kwargs):
    """Keep configs whose K/V pipeline fits in shared memory, whose registers do not spill and whose
    rows suit the row count (a symbolic one, key 0, taken as long: 64 rows or more)."""
    rows, (block_d, block_dv, _, _) = named_args["ROWS_KEY"], kwargs["HEAD"]
    element = named_args["Q"].element_size()
    kept = []
    for config in configs:
        m, n, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
        shared = element * (m * block_d + config.num_stages * n * (block_d + block_dv))
        row_fit = m >= 64 if rows == 0 else m <= max(16, rows) and (m >= 64 or rows <= 64)
        if shared <= 200 * 1024 and row_fit and registers_fit(m * block_dv, 2 * m * n, warps):
            kept.append(config)
    kept = kept or configs[-1:]
    return kept if tuning_pays(rows, named_args["LK_KEY"]) else kept[:1]


_STRIDES = {"sq": 4, "sk": 4, "sv": 4, "sm": 4, "sc": 4, "sizes": 6, "literals": 7}
attention_forward_kernel = autotune(_forward_configs(), key=["ROWS_KEY", "LK_KEY", "HEAD", "RULE", "PACK_GQA"],
                                    prune_configs_by={"early_config_prune": _prune_forward_configs})(
    flat_kernel(attention_forward_program, "_attention_forward_kernel", {**_STRIDES, "so": 5, "ss": 4}))
merge_splits_kernel = flat_kernel(merge_splits_program, "_merge_splits_kernel",
                                  {**_STRIDES, "so": 4, "ss": 3, "sp": 5, "st": 4})


def output_strides(q: torch.Tensor, last_dim: int) -> tuple:
    """Strides of a [B, H, L, last_dim] output laid out like q: [B, L, H, ·] memory when q is a transposed
    view of that layout (the caller's transpose back is then free), else contiguous."""
    b, h, length, _ = q.shape
    if q.stride(1) < q.stride(2) and h > 1 and length > 1:
        return (length * h * last_dim, last_dim, h * last_dim, 1)
    return (h * length * last_dim, length * last_dim, last_dim, 1)


def output_like(q: torch.Tensor, last_dim: int) -> torch.Tensor:
    b, h, length, _ = q.shape
    return torch.empty_strided((b, h, length, last_dim), output_strides(q, last_dim), dtype=q.dtype, device=q.device)
