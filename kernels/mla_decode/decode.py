"""The absorbed-MLA decode kernel: every query head of a token against the latent cache in one pass.

One program holds BLOCK_M query rows of one batch element — the rows run over (new token, head), so all heads
of a token share the program — and walks BLOCK_N context positions at a time: the latent block c [BLOCK_N, R]
is read once and used twice (scores q_lat·cᵀ, then p·c, since c is both key and value), k_pe [BLOCK_N, P]
once. The softmax is online in float32 on exp2. Long contexts are split across programs (flash-decoding) when
the batch × head blocks do not fill the GPU; each split writes its normalized partial output and log2-sum-exp,
and a second kernel merges them. Split 0 holds position 0, which every new token sees, so a merged row always
has a finite total.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..attention.tiles import NUMERICS_DOT_PRECISION, Numerics, as_constexprs, mma_operand
from ..language import to_dtype
from ..runtime import cdiv, flat_kernel, interpreting, launch, next_pow2, program_slots

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeTiling:
    """Rows (token, head) and context positions per program, warps, pipeline depth, context splits."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int


def _split_cost(splits: int, batch: int, m_blocks: int, blocks: int, block_n: int, block_m: int, latent: int,
                row_bytes: int, slots: int) -> float:
    """Bytes one multiprocessor moves for a split count: waves of programs (a partial wave costs a whole one)
    times the cache rows each program reads, plus its share of the float32 partial outputs the merge writes and
    reads back. (The H200 sweep's best split counts are this model's: 32 at batch 1, 4 at batch 8, 16k.)"""
    waves = cdiv(batch * m_blocks * splits, slots)
    read = waves * cdiv(blocks, splits) * block_n * row_bytes
    partial = 0 if splits == 1 else batch * m_blocks * splits * block_m * latent * 4 * 2 / slots
    return read + partial


@functools.lru_cache(maxsize=4096)
def decode_tiling(batch: int, rows: int, context: int, latent: int, rope: int, element: int,
                  slots: int) -> DecodeTiling:
    """The default tiling of a call: for V3's 512-wide latent 32 rows (heads) × 64 positions a block, 4 warps,
    3 stages (the H200 sweep's best at 16k, batch 1 and 8: 1.5-1.9x the 64 × 32, 8-warp tiling; the [32, 512]
    float32 accumulator stays in registers), and the split count `_split_cost` finds cheapest."""
    if interpreting():
        block_m, block_n, warps, stages = 16, 16, 4, 1
    elif next_pow2(latent) >= 256:
        block_m, block_n, warps, stages = min(32, max(16, next_pow2(rows))), 64, 4, 3
    else:
        block_m, block_n, warps, stages = min(64, max(16, next_pow2(rows))), 64, 4, 2
    m_blocks, blocks = cdiv(rows, block_m), cdiv(context, block_n)
    costs = {s: _split_cost(s, batch, m_blocks, blocks, block_n, block_m, latent, (latent + rope) * element, slots)
             for s in range(1, min(blocks, 256) + 1)}
    splits = min(costs, key=costs.get)
    return DecodeTiling(block_m, block_n, warps, stages, cdiv(blocks, cdiv(blocks, splits)))


@triton.jit
def _row_pointers(ptr, batch, t, h, strides):
    return ptr + batch * strides[0] + t.to(tl.int64) * strides[1] + h.to(tl.int64) * strides[2]


@triton.jit
def mla_decode_program(QL, QP, C, KP, Out, PartOut, PartStats, sql, sqp, sc, skp, new_tokens, heads, context,
                       latent, rope, scale_log2, blocks_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr, NUMERICS: tl.constexpr):
    m_block, split, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as float64
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = new_tokens * heads
    row_ok = rows < n_rows
    t, h = rows // heads, rows % heads
    r, p = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_P)
    r_ok, p_ok = r < latent, p < rope
    q = tl.load(_row_pointers(QL, batch, t, h, sql)[:, None] + r[None, :] * sql[3],
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    qp = tl.load(_row_pointers(QP, batch, t, h, sqp)[:, None] + p[None, :] * sqp[3],
                 mask=row_ok[:, None] & p_ok[None, :], other=0.0)
    q, qp = mma_operand(q, NUMERICS), mma_operand(qp, NUMERICS)
    last = context - new_tokens + t  # the last position each row sees
    last_t = (tl.minimum(m_block * BLOCK_M + BLOCK_M, n_rows) - 1) // heads
    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(tl.minimum(lo + blocks_per_split * BLOCK_N, context), context - new_tokens + last_t + 1)
    c_base, kp_base = C + batch * sc[0], KP + batch * skp[0]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        c = tl.load(c_base + n.to(tl.int64)[:, None] * sc[1] + r[None, :] * sc[2],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        kp = tl.load(kp_base + n.to(tl.int64)[:, None] * skp[1] + p[None, :] * skp[2],
                     mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        c = mma_operand(c, NUMERICS)
        s = tl.dot(q, tl.trans(c), input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
        s = tl.dot(qp, tl.trans(mma_operand(kp, NUMERICS)), s, input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
        s = tl.where(n_ok[None, :] & (n[None, :] <= last[:, None]), s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        e = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(e, 1)
        acc = tl.dot(mma_operand(to_dtype(e, C.dtype.element_ty), NUMERICS), c, acc * alpha[:, None],
                     input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    out_rows = (batch * n_rows + rows.to(tl.int64)) * latent
    store_mask = row_ok[:, None] & r_ok[None, :]
    if SPLIT:
        part = (split * tl.num_programs(2) * n_rows).to(tl.int64)
        tl.store(PartOut + part * latent + out_rows[:, None] + r[None, :], out, mask=store_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
        tl.store(PartStats + part + batch * n_rows + rows, lse, mask=row_ok)
    else:
        tl.store(Out + out_rows[:, None] + r[None, :], to_dtype(out, Out.dtype.element_ty), mask=store_mask)


# launched flat (strides as scalars) so that Inductor's generated code can launch it (runtime.flat_kernel)
_mla_decode_kernel = flat_kernel(mla_decode_program, "_mla_decode_kernel", {"sql": 4, "sqp": 4, "sc": 3, "skp": 3})


@triton.jit
def _merge_kernel(Out, PartOut, PartStats, n_rows, latent, splits, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the splits' partial outputs of BLOCK_M rows: weights 2^(lse_s − max lse)."""
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    r = tl.arange(0, BLOCK_R)
    mask = row_ok[:, None] & (r < latent)[None, :]
    stride = tl.num_programs(1) * n_rows  # one split's rows
    stats = PartStats + batch * n_rows + rows
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(splits):
        top = tl.maximum(top, tl.load(stats + s * stride, mask=row_ok, other=0.0))
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    out_rows = (batch * n_rows + rows.to(tl.int64)) * latent
    for s in range(splits):
        weight = tl.exp2(tl.load(stats + s * stride, mask=row_ok, other=0.0) - top)
        part = PartOut + (s * stride).to(tl.int64) * latent + out_rows[:, None] + r[None, :]
        acc += weight[:, None] * tl.load(part, mask=mask, other=0.0)
        total += weight
    tl.store(Out + out_rows[:, None] + r[None, :], to_dtype(acc / total[:, None], Out.dtype.element_ty), mask=mask)


def mla_decode_launch(q_lat: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor, scale: float,
                      tiling: DecodeTiling | None = None) -> torch.Tensor:
    """o_lat [B, Lq, H, R] (contiguous, q_lat's dtype); `tiling` defaults to `decode_tiling` (sweeps pass their
    own)."""
    batch, new_tokens, heads, latent = q_lat.shape
    context, rope = c.shape[1], k_pe.shape[2]
    rows = new_tokens * heads
    tiling = tiling or decode_tiling(batch, rows, context, latent, rope, c.element_size(), program_slots(c.device))
    out = torch.empty(batch, new_tokens, heads, latent, dtype=q_lat.dtype, device=q_lat.device)
    blocks_per_split = cdiv(cdiv(context, tiling.block_n), tiling.splits)
    splits = cdiv(cdiv(context, tiling.block_n), blocks_per_split)
    split = splits > 1
    part_out = q_lat.new_empty((splits, batch, rows, latent) if split else (0,), dtype=torch.float32)
    part_stats = q_lat.new_empty((splits, batch, rows) if split else (0,), dtype=torch.float32)
    block_r, block_p = max(32, next_pow2(latent)), max(32, next_pow2(rope))
    fp32_exact = q_lat.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    launch(_mla_decode_kernel, (cdiv(rows, tiling.block_m), splits, batch), ("mla_decode",),
           q_lat, q_pe, c, k_pe, out, part_out, part_stats, *q_lat.stride(), *q_pe.stride(), *c.stride(),
           *k_pe.stride(), new_tokens, heads, context, latent, rope, float(scale) * LOG2E, blocks_per_split,
           BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_R=block_r, BLOCK_P=block_p, SPLIT=split,
           **as_constexprs({"NUMERICS": Numerics(interpreting(), "ieee" if fp32_exact else "tf32")}),
           num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if split:
        merge_rows = 16
        launch(_merge_kernel, (cdiv(rows, merge_rows), batch), ("mla_decode.merge",), out, part_out, part_stats,
               rows, latent, splits, BLOCK_M=merge_rows, BLOCK_R=block_r, num_warps=4)
    return out
