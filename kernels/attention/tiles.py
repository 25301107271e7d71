"""What the forward and backward kernels share: loading tiles, which tiles to visit, one tile's scores.

Scores are kept in log2 units (natural score · log2 e) so the softmax runs on exp2. A value
below −FLT_MAX/log2 e (finfo.min fills) would overflow there; it is clamped to −FLT_MAX, so
all such fills compare equal (as they do in float64, where adding a score to them is lost).

Tile classes (per 128×128 cell of the score matrix on the GPU, 32×32 under the interpreter):
SKIP (every score is excluded by position, a False bool or a float ≤ −FLT_MAX/log2 e),
FULL (every score visible, mask zero, cell inside the matrix), OPEN (not FULL, but the mask hides nothing:
every value True, or a float whose log2-units value is finite and above −FLT_MAX: a bias) or PARTIAL. Tiles
one by one run FULL cells unmasked and OPEN ones masked; a run of tiles that positions leave fully visible runs
without elementwise masks while its cells are FULL or OPEN (`open_run`), adding a float mask's values. A skipped score
is at most `skipped_bound` = max(mask_value, −FLT_MAX) in log2 units, so skipping cannot change a row
whose log-sum-exp is above skipped_bound + 160 (2^−160 is zero in float32). With an added mask value
a skipped score is score + skipped_bound: the bound is then skipped_bound / 2 where that is higher
(exact while scores stay below half its size). Rows at or below the bound (fully masked rows
and their kin) are recomputed without skipping: that keeps the replaced code's answer for them
(reference.py) — NaN for a −inf fill, the average of V over all keys for a finite one, a softmax
over score + fill when added. Rows SDPA zeroes keep a log-sum-exp of +inf, which gives them
zero probabilities (and gradients) in the backward.

NaN and ±inf follow reference.py's rule, whatever the tiling. Plain passes are the code above; a
program whose result is not finite (a dot may have carried a NaN or ±inf from a position some row
cannot see: 0·NaN) is redone by an EXACT pass, in EXACT_BLOCK tiles: unreached positions get
probability 0 and form no product (selected_dot). Finite inputs pay one reduction per program.

The kernels take related values together. Runtime tuples (Triton specializes each element as it
would a lone argument: == 1, divisibility by 16):
    strides      one tuple per tensor, in its dimension order
    sizes        (Hq, group, Lq, Lk, D, Dv)
    literals     (pos_offset, window, scale, softcap, mask_value_log2, saturation_lse, dropout_p, seed)
and constexpr named tuples, read by attribute (HEAD[HEAD_BLOCK_D]): HeadBlocks, ScoreRule, Numerics below.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..runtime import cdiv, flat_kernel, interpreting, launch

LOG2E = tl.constexpr(1.4426950408889634)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
SKIP = tl.constexpr(0)
PARTIAL = tl.constexpr(1)
FULL = tl.constexpr(2)
OPEN = tl.constexpr(3)
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2
# The tile side of EXACT passes (selected_dot): they are rare, and small tiles keep their registers under the plain
# loops' (ptxas would otherwise spill those and serialize their wgmma: sm_90, triton 3.6 and 3.9)
EXACT_BLOCK = tl.constexpr(16)


class HeadBlocks(NamedTuple):
    """HEAD: the head dims as the kernels tile them (powers of two, 32 at least) and whether they pad."""
    block_d: int
    block_dv: int
    pad_d: bool
    pad_dv: bool


class ScoreRule(NamedTuple):
    """RULE: which scores a row sees and how they are formed (tile_scores); mask_kind 0 none, 1 bool, 2 float."""
    causal: bool
    windowed: bool
    mask_kind: int
    add_mask_value: bool
    softcap: bool
    dropout: bool
    sinks: bool  # a per-head logit in each row's softmax (attend_rows)


class Numerics(NamedTuple):
    """NUMERICS: float32 copies of 16-bit operands (the interpreter), and the dots' input precision."""
    upcast: bool
    dot_precision: str


# The kernels take HEAD, RULE and NUMERICS as plain tuples (`as_constexprs`) and read their fields by position:
# Inductor's generated code spells a launch's constexprs by their repr, where only Python's and Triton's names
# resolve. The positions, named after the fields:
HEAD_BLOCK_D, HEAD_BLOCK_DV, HEAD_PAD_D, HEAD_PAD_DV = (tl.constexpr(i) for i in range(4))
RULE_CAUSAL, RULE_WINDOWED, RULE_MASK_KIND, RULE_ADD_MASK_VALUE, RULE_SOFTCAP, RULE_DROPOUT, RULE_SINKS = (
    tl.constexpr(i) for i in range(7))
NUMERICS_UPCAST, NUMERICS_DOT_PRECISION = (tl.constexpr(i) for i in range(2))


def as_constexprs(constexprs: dict) -> dict:
    """A launch's constexprs with the records above as plain tuples."""
    return {name: tuple(value) if isinstance(value, tuple) else value for name, value in constexprs.items()}


def class_cell() -> int:
    """Side of a tile-class cell; every kernel block divides it (blocks are powers of two ≤ 128)."""
    return 32 if interpreting() else 128


@triton.jit
def load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A 2-D tile, zero outside; the bounds checks that cannot fail are left out at compile time."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def mma_operand(x, NUMERICS: tl.constexpr):
    """A dot operand; the interpreter's bf16/fp16 arithmetic is wrong: it multiplies float32 copies instead."""
    if NUMERICS[NUMERICS_UPCAST]:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def tile_ranges(lo_any, hi_any, lo_full, hi_full, length, BLOCK: tl.constexpr):
    """Tiles [t_lo, t_hi) touch [lo_any, hi_any); tiles [f_lo, f_hi) ⊆ them lie inside [lo_full, hi_full)
    and inside [0, length). The tiles between need elementwise masking."""
    lo_any = tl.maximum(lo_any, 0)
    hi_any = tl.minimum(hi_any, length)
    t_lo = lo_any // BLOCK
    t_hi = tl.where(hi_any > lo_any, tl.cdiv(hi_any, BLOCK), t_lo)
    f_lo = tl.cdiv(tl.maximum(lo_full, 0), BLOCK)
    f_hi = tl.minimum(hi_full, length) // BLOCK
    f_lo = tl.minimum(tl.maximum(f_lo, t_lo), t_hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), t_hi)
    return t_lo, f_lo, f_hi, t_hi


@triton.jit
def key_tiles(q_pos_lo, q_pos_hi, Lk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for queries at positions [q_pos_lo, q_pos_hi]: causal keeps k ≤ pos, a window pos − k < window."""
    lo_any = 0
    hi_any = Lk
    lo_full = 0
    hi_full = Lk
    if CAUSAL:
        hi_any = q_pos_hi + 1
        hi_full = q_pos_lo + 1
    if WINDOWED:
        lo_any = q_pos_lo - window + 1
        lo_full = q_pos_hi - window + 1
    return tile_ranges(lo_any, hi_any, lo_full, hi_full, Lk, BLOCK_N)


@triton.jit
def query_tiles(k_lo, k_hi, Lq, pos_offset, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Query tiles that see keys [k_lo, k_hi] (query i sits at position i + pos_offset)."""
    lo_any = 0
    hi_any = Lq
    lo_full = 0
    hi_full = Lq
    if CAUSAL:
        lo_any = k_lo - pos_offset
        lo_full = k_hi - pos_offset
    if WINDOWED:
        hi_any = k_hi + window - pos_offset
        hi_full = k_lo + window - pos_offset
    return tile_ranges(lo_any, hi_any, lo_full, hi_full, Lq, BLOCK_M)


@triton.jit
def mask_to_log2(x):
    """A float mask value in log2 units, finite values clamped at −FLT_MAX (−inf stays −inf)."""
    return tl.where(x == float("-inf"), x, tl.maximum(x * LOG2E, -FLT_MAX, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def tanh(x):
    """tanh from exp2 (portable between the compiler and the interpreter; saturates to ±1)."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def tile_scores(qk, q_idx, q_open, q_ok, k_idx, mask_ptrs, Lk, literals, MASKED: tl.constexpr, EXACT: tl.constexpr,
                RULE: tl.constexpr, ADD_OPEN: tl.constexpr):
    """(scores in log2 units, reach, passes, d(softcapped score)/d(scaled score)) of one tile.

    q_idx/q_open/q_ok and k_idx broadcast against qk ([M, 1] and [1, N], or transposed). Excluded scores
    (position, False in a bool mask) become mask_value, or get it added with RULE[RULE_ADD_MASK_VALUE]; keys
    past Lk −inf. `passes` is where a gradient reaches the score: not replaced. EXACT passes also follow the
    NaN rule (reference.py): a position is visible unless excluded or hidden by a float mask value
    ≤ −FLT_MAX/log2 e; `reach` holds the visible positions and, in open rows (q_open), every position inside
    the matrix; unreached scores are −inf, pass no gradient, and form no product (selected_dot). With MASKED
    False the tile is known fully visible and inside the matrix (reach and passes are a constant True); with
    ADD_OPEN too, the float mask is added, its values known finite in log2 units (OPEN cells: no clamp).
    """
    pos_offset, window, scale, softcap, mask_value_log2 = literals[0], literals[1], literals[2], literals[3], \
        literals[4]
    if RULE[RULE_SOFTCAP]:
        t = tanh(qk * (scale / softcap))
        scores = t * (softcap * LOG2E)
        softcap_grad = 1.0 - t * t
    else:
        scores = qk * (scale * LOG2E)
        softcap_grad = 1.0
    reach = True
    keep = True
    if MASKED:
        in_range = k_idx < Lk
        keep = in_range
        q_pos = q_idx + pos_offset
        if RULE[RULE_CAUSAL]:
            keep = keep & (k_idx <= q_pos)
        if RULE[RULE_WINDOWED]:
            keep = keep & (q_pos - k_idx < window)
        if RULE[RULE_MASK_KIND] == 1:
            keep = keep & (tl.load(mask_ptrs, mask=in_range & q_ok, other=1) != 0)
        visible = keep
        if RULE[RULE_MASK_KIND] == 2:
            added = mask_to_log2(tl.load(mask_ptrs, mask=in_range & q_ok, other=0.0).to(tl.float32))
            scores = scores + added
            if EXACT:
                visible = visible & ~(added <= -FLT_MAX)
        if RULE[RULE_ADD_MASK_VALUE]:
            scores = tl.where(keep, scores, scores + mask_value_log2)
            keep = in_range
        else:
            scores = tl.where(keep, scores, mask_value_log2)
        scores = tl.where(in_range, scores, float("-inf"))
        if EXACT:
            reach = in_range & (visible | q_open)
            keep = keep & reach
            scores = tl.where(reach, scores, float("-inf"))
    elif ADD_OPEN:
        scores = scores + tl.load(mask_ptrs, mask=(k_idx < Lk) & q_ok, other=0.0).to(tl.float32) * LOG2E
    return scores, reach, keep, softcap_grad


@triton.jit
def open_run(cells, cell_stride, lo, hi, BLOCK: tl.constexpr, CELL: tl.constexpr, MASK_KIND: tl.constexpr):
    """(end, plain): tiles [lo, end) of [lo, hi) (BLOCK wide, along one side of the class map: cell i at
    cells + i·cell_stride), which positions leave fully visible, run together without elementwise masks: the
    longest run of FULL and OPEN cells; plain if they need no mask added (every cell FULL, or a bool mask).
    The tiles after it (from a cell that may hide a score) go one by one."""
    c_lo = lo * BLOCK // CELL
    first_closed = tl.cdiv(hi * BLOCK, CELL)
    n_full = 0
    for c in range(c_lo, tl.cdiv(hi * BLOCK, CELL)):
        cls = tl.load(cells + c * cell_stride)
        first_closed = tl.where((cls != FULL) & (cls != OPEN) & (c < first_closed), c, first_closed)
        n_full += ((cls == FULL) & (c < first_closed)).to(tl.int32)
    end = tl.minimum(tl.maximum(first_closed * CELL // BLOCK, lo), hi)
    return end, (MASK_KIND == 1) | (n_full == first_closed - c_lo)


@triton.jit
def open_rows(lse, row_ok, saturation_lse):
    """Rows whose log-sum-exp (log2 units) of the scores as formed is at or below the bound: their weight may lie
    on hidden positions (fully masked rows), so every position reaches them (reference.py; NaN: not)."""
    return row_ok & (lse <= saturation_lse)


@triton.jit
def probabilities(scores, reach, shift, log2_sum, MASKED: tl.constexpr, EXACT: tl.constexpr):
    """Softmax probabilities from the forward's statistics (rows along dim 0 of shift/log2_sum
    broadcast against scores); EXACT: exactly 0 where unreached (a row's statistics may be NaN). Masked
    tiles subtract the shift first, exact for ≈ −FLT_MAX rows."""
    if MASKED:
        p = tl.exp2((scores - shift) - log2_sum)
        if EXACT:
            p = tl.where(reach, p, 0.0)
        return p
    else:
        return tl.exp2(scores - (shift + log2_sum))


@triton.jit
def nonfinite(x):
    """Where x is NaN or ±inf (NaN is not below inf)."""
    return ~(tl.abs(x.to(tl.float32)) < float("inf"))


@triton.jit
def any_nonfinite(x):
    return tl.max(nonfinite(x).to(tl.int32)) > 0


@triton.jit
def selected_dot(a, b, reach, acc, EXACT: tl.constexpr, NUMERICS: tl.constexpr):
    """acc + a·b; with EXACT, the products a[i, j]·b[j, :] are formed only where position j reaches row i.

    A dot multiplies every pair, and a zero weight times a NaN or ±inf in b is NaN: a value a row cannot see
    would reach it, in some rows and not others by where the tiles fall. So plain passes take plain dots and a
    program whose result is not finite is redone by an EXACT pass, a loop of its own (the plain loops keep their
    code and pipelining). There, rows of b holding NaN or ±inf leave the dot and their products are formed in
    float32 where they reach (0 · inf is NaN where a zero weight reaches an infinite value, as in the replaced
    code).
    """
    if EXACT:
        a = tl.where(reach, a, 0.0)
        bad_rows = tl.max(nonfinite(b).to(tl.int32), 1)
        acc = tl.dot(a, tl.where(bad_rows[:, None] > 0, 0.0, b), acc, input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
        keys = tl.arange(0, b.shape[0])
        for j in range(b.shape[0]):
            if tl.sum(tl.where(keys == j, bad_rows, 0)) > 0:  # where() selects: other rows' NaN stay out
                a_j = tl.sum(tl.where(keys[None, :] == j, a.to(tl.float32), 0.0), 1)
                reach_j = tl.sum(tl.where(keys[None, :] == j, reach.to(tl.int32), 0), 1) > 0
                b_j = tl.sum(tl.where(keys[:, None] == j, b.to(tl.float32), 0.0), 0)
                acc = tl.where(reach_j[:, None], acc + a_j[:, None] * b_j[None, :], acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=NUMERICS[NUMERICS_DOT_PRECISION])
    return acc


@triton.jit
def kernel_literals(literals, Seed, RULE: tl.constexpr):
    """(pos_offset, window, scale, softcap, mask_value_log2, saturation_lse, dropout_p, seed) from a launch's seven
    literals and the seed tensor: floats in float32 (Inductor passes Python floats as float64), the dropout seed
    read on the device (0 without dropout: Seed is then empty)."""
    seed = 0
    if RULE[RULE_DROPOUT]:
        seed = tl.load(Seed)
    return (literals[0], literals[1], tl.cast(literals[2], tl.float32), tl.cast(literals[3], tl.float32),
            tl.cast(literals[4], tl.float32), tl.cast(literals[5], tl.float32), tl.cast(literals[6], tl.float32), seed)


@triton.jit
def dropout_keep(seed, stream, q_idx, k_idx, dropout_p):
    """Philox keep-mask of one tile: the same (seed, batch·head, query, key) always draws the same number."""
    zero = (q_idx * 0 + k_idx * 0 + stream * 0).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, k_idx.to(tl.uint32) + zero, q_idx.to(tl.uint32) + zero,
                              stream.to(tl.uint32) + zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def rows_saturated(lse, row_ok, saturation_lse):
    """True if some row's log-sum-exp is not above the bound (or NaN): skipping tiles may change it."""
    return tl.max((row_ok & ~(lse > saturation_lse)).to(tl.int32), 0) > 0


@triton.jit
def classify_tiles_program(Mask, Classes, sm, sc, heads_in_map, Lq, Lk, pos_offset, window, CAUSAL: tl.constexpr,
                           WINDOWED: tl.constexpr, IS_BOOL: tl.constexpr, CELL: tl.constexpr):
    n_cell = tl.program_id(0)
    m_cell = tl.program_id(1)
    batch = tl.program_id(2) // heads_in_map
    head = tl.program_id(2) % heads_in_map
    rows = m_cell * CELL + tl.arange(0, CELL)
    cols = n_cell * CELL + tl.arange(0, CELL)
    # a broadcast dimension (stride 0) is read once
    row_ok = (rows < Lq) & ((rows * 0 + sm[2] != 0) | (rows == m_cell * CELL))
    col_ok = (cols < Lk) & ((cols * 0 + sm[3] != 0) | (cols == n_cell * CELL))
    inside = row_ok[:, None] & col_ok[None, :]
    ptrs = Mask + batch.to(tl.int64) * sm[0] + head.to(tl.int64) * sm[1] + rows[:, None].to(tl.int64) * sm[2] \
        + cols[None, :].to(tl.int64) * sm[3]
    values = tl.load(ptrs, mask=inside, other=0)
    if IS_BOOL:
        hidden = values == 0
        shown = values != 0
        opens = shown
    else:
        values = values.to(tl.float32)
        hidden = mask_to_log2(values) <= -FLT_MAX
        shown = values == 0.0
        opens = tl.abs(values * LOG2E) < FLT_MAX  # (not NaN)
    mask_skips = tl.sum((inside & ~hidden).to(tl.int32)) == 0
    mask_shows = tl.sum((inside & ~shown).to(tl.int32)) == 0
    mask_opens = tl.sum((inside & ~opens).to(tl.int32)) == 0
    q_lo = m_cell * CELL + pos_offset
    q_hi = tl.minimum(m_cell * CELL + CELL, Lq) - 1 + pos_offset
    k_lo = n_cell * CELL
    k_hi = tl.minimum(n_cell * CELL + CELL, Lk) - 1
    position_skips = False
    position_shows = ((m_cell + 1) * CELL <= Lq) & ((n_cell + 1) * CELL <= Lk)
    if CAUSAL:
        position_skips = position_skips | (k_lo > q_hi)
        position_shows = position_shows & (k_hi <= q_lo)
    if WINDOWED:
        position_skips = position_skips | (q_lo - k_hi >= window)
        position_shows = position_shows & (q_hi - k_lo < window)
    cls = tl.where(mask_skips | position_skips, SKIP,
                   tl.where(mask_shows & position_shows, FULL, tl.where(mask_opens, OPEN, PARTIAL)))
    tl.store(Classes + batch * sc[0] + head * sc[1] + m_cell * sc[2] + n_cell * sc[3], cls.to(tl.int8))


_classify_tiles_kernel = flat_kernel(classify_tiles_program, "_classify_tiles_kernel", {"sm": 4, "sc": 4})


def classify_tiles(mask: torch.Tensor, strides: tuple, heads: tuple[int, int], is_bool: bool, lq: int, lk: int,
                   pos_offset: int, causal: bool, window: int) -> torch.Tensor:
    """int8 [B', H', cdiv(Lq, cell) + 1, cdiv(Lk, cell) + 1] tile classes of a mask read with `strides` as
    [B, H, Lq, Lk] (heads = (B, H); B', H' are 1 where the mask broadcasts), positions folded in (`class_map_shape`:
    the last cells lie past the matrix, SKIP, never read)."""
    shape = class_map_shape(strides, heads, lq, lk)
    classes = torch.empty(shape, dtype=torch.int8, device=mask.device)  # the cells past the matrix: SKIP
    launch(_classify_tiles_kernel, (shape[3], shape[2], shape[0] * shape[1]), ("attention.classify", lq, lk),
           mask, classes, *strides, *classes.stride(), shape[1], lq, lk, pos_offset, max(window, 0),
           CAUSAL=causal, WINDOWED=window > 0, IS_BOOL=is_bool, CELL=class_cell(), num_warps=4)
    return classes


def class_map_shape(strides: tuple | None, heads: tuple[int, int], lq: int, lk: int) -> tuple[int, ...]:
    """Shape `classify_tiles` returns for a mask of these broadcast strides ((0,) without a mask). Each cell
    dim has one more than the kernels read: traced with symbolic lengths, a dim that may be 1 (cdiv(Lk, cell))
    would guard on its size (fake tensors' contiguity checks skip size-1 dims; torch 2.13), one of 2 or more
    does not."""
    if strides is None:
        return (0,)
    cell = class_cell()
    return (heads[0] if strides[0] != 0 else 1, heads[1] if strides[1] != 0 else 1, cdiv(lq, cell) + 1,
            cdiv(lk, cell) + 1)


def class_strides(classes: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of the class map for kernels (0 along broadcast batch/head dims)."""
    if classes.dim() != 4:
        return (0, 0, 0, 0)
    return tuple(0 if classes.shape[i] == 1 else classes.stride(i) for i in range(2)) + tuple(classes.stride()[2:])
