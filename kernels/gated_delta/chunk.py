"""The chunkwise forward of the gated delta rule in three Triton kernels (reference.py says what it computes).

Within a chunk of C tokens the C updates fold into one unit lower-triangular system,
    (I + A) with A[i, j] = β_i (k_i·k_j) exp(G_i − G_j) for j < i,   G = cumulative log decay in the chunk,
whose inverse turns the chunk's tokens into what they write, u = (I + A)⁻¹(β v), and how they read
the state the chunk starts from, w = (I + A)⁻¹(β exp(G) k) (the WY form). Then:
    1. `_intra_chunk_kernel`, every chunk in parallel: A, its inverse (`unit_lower_inverse`), w and u;
    2. `_state_scan_kernel`, chunk after chunk per (batch, head, value block), the state in registers:
       u ← u − w·S (what each token really writes), S ← S·exp(G_last) + (k·exp(G_last − G))ᵀ·u,
       keeping the state each chunk starts from;
    3. `_output_kernel`, every chunk in parallel: o = (q·S)·exp(G) + tril(q·kᵀ·exp(G_i − G_j))·u.
Everything is computed in float32 (the dots take tf32 for 16-bit inputs, full float32 for float32 inputs; G
is a float32 pair, see `log_decays`: kernel 1 stores it for the others); scratch: w and u [B, Hv, T, D] and
G [B, Hv, 2, T] float32, the chunk-start states [B, Hv, chunks, Dk, Dv] in `state_dtype`. The backward
(backward.py) runs kernels 1 and 2 again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..language import exp, to_dtype
from ..runtime import cdiv, launch, next_pow2, program_slots


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
def chunk_rows(chunk, length, CHUNK: tl.constexpr):
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    return rows, rows < length


@triton.jit
def _two_sum(a_high, a_low, b_high, b_low):
    """(a + b) as a float32 pair high + low whose high is the rounded sum (Knuth's TwoSum, renormalized)."""
    total = a_high + b_high
    b_part = total - a_high
    low = (a_high - (total - b_part)) + (b_high - b_part) + a_low + b_low
    high = total + low
    return high, low - (high - total)


@triton.jit
def log_decays(g_ptr, batch, head, rows, row_ok, row_stride, batch_stride, head_stride, CHUNK: tl.constexpr):
    """G, the cumulative log decay in the chunk, as a pair (high, low), and exp(G_last − G), exp(G_last).

    G reaches −1000 and beyond under strong decays (exp(g) ~ 1e-9), where float32 G_i − G_j is only good to
    ~1e-4 (absolute) of exp(g)'s argument: the pair keeps differences exact to float32, which g's gradient needs.
    G_last is the cumulative sum's last row (g is 0 past the sequence), so the chunk's last token decays by
    exactly exp(0)."""
    g = load_token_values(g_ptr, batch, head, rows, row_ok, row_stride, batch_stride, head_stride)
    high, low = tl.associative_scan((g, tl.zeros_like(g)), 0, _two_sum)
    is_last = tl.arange(0, CHUNK) == CHUNK - 1
    last_high, last_low = tl.sum(tl.where(is_last, high, 0.0), axis=0), tl.sum(tl.where(is_last, low, 0.0), axis=0)
    return high, low, exp((last_high - high) + (last_low - low)), exp(last_high)


@triton.jit
def stored_log_decays(decays_ptr, bh, chunk, length, CHUNK: tl.constexpr):
    """`log_decays` from G as `_intra_chunk_kernel` stored it ([B·Hv, 2, T], high then low): the kernels after it
    skip the TwoSum scan and its cross-warp reductions (the scans did them at every step of their sequential
    loops, once per value block). Rows past the sequence read the last row's G, as the cumulative sum has it."""
    rows = tl.minimum(chunk * CHUNK + tl.arange(0, CHUNK), length - 1)
    last = tl.minimum(chunk * CHUNK + CHUNK - 1, length - 1)
    base = decays_ptr + bh.to(tl.int64) * 2 * length
    high, low = tl.load(base + rows), tl.load(base + length + rows)
    last_high, last_low = tl.load(base + last), tl.load(base + length + last)
    return high, low, exp((last_high - high) + (last_low - low)), exp(last_high)


@triton.jit
def decay_within(high, low, CHUNK: tl.constexpr, INCLUSIVE: tl.constexpr):
    """exp(G_i − G_j) on and below the diagonal (strictly below unless INCLUSIVE), 0 above; G = high + low."""
    i = tl.arange(0, CHUNK)
    below = (i[:, None] >= i[None, :]) if INCLUSIVE else (i[:, None] > i[None, :])
    difference = (high[:, None] - high[None, :]) + (low[:, None] - low[None, :])
    return tl.where(below, exp(tl.where(below, difference, 0.0)), 0.0)


@triton.jit
def unit_lower_inverse(a, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)⁻¹ for a strictly lower-triangular [CHUNK, CHUNK] A (rows past the sequence 0), by doubling the
    diagonal blocks it has inverted: a triangular matrix's inverse has the inverses of its diagonal blocks on
    its own diagonal, so with X the s×s ones done,
        [[X₁, 0], [−X₂·A₂₁·X₁, X₂]] = X − X·A_s·X,   A_s: A inside the 2s-blocks, outside the s-blocks,
    gives the 2s×2s ones: X₂ = I − A₂ first, then log2(CHUNK) − 1 levels of two [C, C] dots and no sequential
    row loop (forward substitution took a cross-warp reduction per row). Every X holds entries of the inverse
    itself, so no partial result grows past the answer; the doubling product (I − A)(I + A²)…(I + A³²)'s reach
    C(62, 31) ~ 5e17 for near-equal keys and β 1 (I + A all ones below the diagonal, its inverse ±1), where
    float32 keeps nothing. PRECISION: the dots' (tf32 for 16-bit inputs, whose roundings are those A's own tf32
    products have: on the H200, outputs and gradients as close to float64 as with tf32x3, near-equal keys with
    β 1 included, and at B8 T2048 H16 D128 the intra-chunk kernel in 373 µs against 769, the backward in 7.4 ms
    against 9.3)."""
    i = tl.arange(0, CHUNK)
    inverse = (i[:, None] == i[None, :]).to(tl.float32) - tl.where(i[:, None] // 2 == i[None, :] // 2, a, 0.0)
    for level in tl.static_range(1, 8):
        if (2 << level) <= CHUNK:  # blocks of s = 2^level rows inverted: join them in pairs
            pair, block = i >> (level + 1), i >> level
            between = (pair[:, None] == pair[None, :]) & (block[:, None] != block[None, :])
            joined = tl.dot(tl.dot(inverse, tl.where(between, a, 0.0), input_precision=PRECISION), inverse,
                            input_precision=PRECISION)
            inverse -= joined
    return inverse


@triton.jit
def state_block(vblock, dk, dv, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """(offsets, mask, value columns) of value block `vblock` of a row-major [Dk, Dv] state."""
    kcols = tl.arange(0, BLOCK_K)
    vcols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    return kcols[:, None] * dv + vcols[None, :], (kcols < dk)[:, None] & (vcols < dv)[None, :], vcols


@triton.jit
def load_state(ptr, index, offsets, mask, dk, dv, PRESENT: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """A [Dk, BLOCK_V] float32 block of state `index` of a [N, Dk, Dv] tensor; zeros where there is none."""
    block = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    if PRESENT:
        block = tl.load(ptr + index.to(tl.int64) * dk * dv + offsets, mask=mask, other=0.0).to(tl.float32)
    return block


@triton.jit
def store_state(ptr, index, offsets, mask, dk, dv, block):
    tl.store(ptr + index.to(tl.int64) * dk * dv + offsets, to_dtype(block, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _intra_chunk_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, decays_ptr, length, heads, groups, dk, dv, eps,
                        k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh, b_sb, b_st, b_sh,
                        CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr,
                        PRECISION: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows, row_ok = chunk_rows(chunk, length, CHUNK)
    kcols, vcols = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V)
    key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                        eps, L2NORM)
    log_decay, low, _, _ = log_decays(g_ptr, batch, head, rows, row_ok, g_st, g_sb, g_sh, CHUNK)
    decay_rows = decays_ptr + bh.to(tl.int64) * 2 * length + rows
    tl.store(decay_rows, log_decay, mask=row_ok)
    tl.store(decay_rows + length, low, mask=row_ok)
    beta = load_token_values(beta_ptr, batch, head, rows, row_ok, b_st, b_sb, b_sh)
    a = tl.dot(key, tl.trans(key), input_precision=PRECISION) * beta[:, None] * decay_within(log_decay, low, CHUNK,
                                                                                             False)
    inverse = unit_lower_inverse(a, CHUNK, PRECISION)
    out_rows = (bh.to(tl.int64) * length + rows)[:, None]
    w = tl.dot(inverse, key * (beta * exp(log_decay))[:, None], input_precision=PRECISION)
    tl.store(w_ptr + out_rows * dk + kcols[None, :], w, mask=row_ok[:, None] & (kcols < dk)[None, :])
    value = load_heads_rows(v_ptr, batch, head, rows, row_ok, v_st, v_sb, v_sh, vcols, dv)
    u = tl.dot(inverse, value * beta[:, None], input_precision=PRECISION)
    tl.store(u_ptr + out_rows * dv + vcols[None, :], u, mask=row_ok[:, None] & (vcols < dv)[None, :])


@triton.jit
def _state_scan_kernel(k_ptr, decays_ptr, w_ptr, u_ptr, states_ptr, initial_ptr, final_ptr, length, heads, groups,
                       dk, dv, n_chunks, eps, k_sb, k_st, k_sh, HAS_INITIAL: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Overwrites u with what each token writes (u − w·S) and stores the state every chunk starts from."""
    vblock, bh = tl.program_id(0), tl.program_id(1)
    batch, head = bh // heads, bh % heads
    kcols = tl.arange(0, BLOCK_K)
    offsets, mask, vcols = state_block(vblock, dk, dv, BLOCK_K, BLOCK_V)
    state = load_state(initial_ptr, bh, offsets, mask, dk, dv, HAS_INITIAL, BLOCK_K, BLOCK_V)
    for chunk in range(n_chunks):
        store_state(states_ptr, bh * n_chunks + chunk, offsets, mask, dk, dv, state)
        rows, row_ok = chunk_rows(chunk, length, CHUNK)
        key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                            eps, L2NORM)
        _, _, to_end, chunk_decay = stored_log_decays(decays_ptr, bh, chunk, length, CHUNK)
        scratch_rows = (bh.to(tl.int64) * length + rows)[:, None]
        w = tl.load(w_ptr + scratch_rows * dk + kcols[None, :], mask=row_ok[:, None] & (kcols < dk)[None, :], other=0.0)
        u_pointers = u_ptr + scratch_rows * dv + vcols[None, :]
        u_mask = row_ok[:, None] & (vcols < dv)[None, :]
        written = tl.load(u_pointers, mask=u_mask, other=0.0) - tl.dot(w, state, input_precision=PRECISION)
        tl.store(u_pointers, written, mask=u_mask)
        state = state * chunk_decay + tl.dot(tl.trans(key * to_end[:, None]), written, input_precision=PRECISION)
    store_state(final_ptr, bh, offsets, mask, dk, dv, state)


@triton.jit
def _output_kernel(q_ptr, k_ptr, decays_ptr, states_ptr, written_ptr, out_ptr, length, heads, groups, dk, dv,
                   n_chunks, scale, eps, q_sb, q_st, q_sh, k_sb, k_st, k_sh, CHUNK: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, L2NORM: tl.constexpr, PRECISION: tl.constexpr):
    chunk, vblock, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = bh // heads, bh % heads
    rows, row_ok = chunk_rows(chunk, length, CHUNK)
    kcols = tl.arange(0, BLOCK_K)
    vcols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    query = l2_normalized(load_heads_rows(q_ptr, batch, head // groups, rows, row_ok, q_st, q_sb, q_sh, kcols, dk),
                          eps, L2NORM) * scale
    key = l2_normalized(load_heads_rows(k_ptr, batch, head // groups, rows, row_ok, k_st, k_sb, k_sh, kcols, dk),
                        eps, L2NORM)
    log_decay, low, _, _ = stored_log_decays(decays_ptr, bh, chunk, length, CHUNK)
    state = tl.load(states_ptr + (bh.to(tl.int64) * n_chunks + chunk) * dk * dv + kcols[:, None] * dv + vcols[None, :],
                    mask=(kcols < dk)[:, None] & (vcols < dv)[None, :], other=0.0).to(tl.float32)
    v_mask = row_ok[:, None] & (vcols < dv)[None, :]
    written = tl.load(written_ptr + (bh.to(tl.int64) * length + rows)[:, None] * dv + vcols[None, :], mask=v_mask,
                      other=0.0)
    scores = tl.dot(query, tl.trans(key), input_precision=PRECISION) * decay_within(log_decay, low, CHUNK, True)
    out = tl.dot(query, state, input_precision=PRECISION) * exp(log_decay)[:, None] \
        + tl.dot(scores, written, input_precision=PRECISION)
    out_rows = ((batch.to(tl.int64) * length + rows) * heads + head)[:, None] * dv
    tl.store(out_ptr + out_rows + vcols[None, :], to_dtype(out, out_ptr.dtype.element_ty), mask=v_mask)


def chunk_size(head_dim_k: int) -> int:
    """Tokens per chunk: 64 up to Dk 128 (the [C, Dk] tiles and the C×C system stay in registers), 32 above."""
    return 64 if head_dim_k <= 128 else 32


def value_block(head_dim_k: int, head_dim_v: int) -> int:
    """Value columns per program of the scans, the output and the gradients: the [Dk, BLOCK_V] state block stays
    in registers, and the scans' two pipeline stages fit the H200's 227 KB of shared memory (64 columns below a
    Dk block of 128, 32 from 128: at Dk 128 the gradient scan takes 193 KB for sm90 with triton 3.6, 64 columns 221 KB;
    three stages 263-295 KB, which failed on the GPU). More value blocks also give the sequential scans more
    programs."""
    return min(64 if next_pow2(head_dim_k) < 128 else 32, max(16, next_pow2(head_dim_v)))


def forward_value_blocks(batch_heads: int, head_dim_k: int, head_dim_v: int, programs: int) -> tuple[int, int]:
    """Value columns per program of the forward's (scan, output kernel): up to Dk 128, 64 for the output kernel
    (it recomputes q·kᵀ per value block: B8 T2048 H16 D128 on the H200, 275 µs against 371 at 32 columns) and for
    the scan where the (batch, head) pairs give the GPU's `programs` slots a program each at 64 columns (it reads w
    and the keys once per value block: 267 against 329 µs), 32 where the latency-bound scan needs the value blocks
    to fill the GPU (B1 T4096: 230 against 403 µs). Above Dk 128, `value_block`'s."""
    narrow = value_block(head_dim_k, head_dim_v)
    if next_pow2(head_dim_k) > 128:
        return narrow, narrow
    wide = min(64, max(16, next_pow2(head_dim_v)))
    return (wide if batch_heads * cdiv(head_dim_v, wide) >= programs else narrow), wide


SCAN_STAGES = 2  # pipeline depth of the scans' loops over chunks


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the forward keeps the chunk-start states in for the output kernel (the scan's own state is float32):
    bfloat16 for bfloat16 inputs, whose output the rounding moves by about its own rounding (1.75e-3 against
    1.70e-3 for near-equal keys with β 1), for half the bytes the scan writes and the output kernel reads;
    float32 otherwise (float16's range would not hold a state), and in the backward, whose gradients of
    float32 g and initial state are held to float32's tolerance. w, u and what tokens write stay float32: those
    are small differences that the output sums over a chunk (rounded to bfloat16 they made that output's
    error 6.5e-3)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@dataclass(frozen=True)
class Geometry:
    """The launch sizes of one call: [B, T, Hk, Dk] keys, [B, T, Hv, Dv] values, chunks and blocks."""
    batch: int
    length: int
    heads: int
    groups: int
    dk: int
    dv: int
    chunk: int
    n_chunks: int
    block_k: int
    block_v: int         # the backward's value block
    scan_block_v: int
    output_block_v: int
    precision: str       # of the dots
    state_dtype: torch.dtype  # of the chunk-start states the output kernel reads

    @staticmethod
    def of(q: torch.Tensor, v: torch.Tensor) -> "Geometry":
        batch, length, heads_k, dk = q.shape
        heads, dv = v.shape[2], v.shape[3]
        chunk = chunk_size(dk)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        return Geometry(batch, length, heads, heads // heads_k, dk, dv, chunk, cdiv(length, chunk),
                        max(16, next_pow2(dk)), value_block(dk, dv),
                        *forward_value_blocks(batch * heads, dk, dv, program_slots(q.device)), precision,
                        state_dtype(q.dtype))

    def scratch(self, *trailing: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A [B, Hv, *trailing] buffer."""
        return torch.empty(self.batch, self.heads, *trailing, dtype=dtype, device=device)

    def common(self) -> tuple:
        return self.length, self.heads, self.groups, self.dk, self.dv

    def constexprs(self, l2norm: bool) -> dict:
        return dict(CHUNK=self.chunk, BLOCK_K=self.block_k, L2NORM=l2norm, PRECISION=self.precision)


def chunk_states(shape: Geometry, k, v, g, beta, initial_state, l2norm: bool, eps: float, final: torch.Tensor):
    """(w, written, states, decays): the intra-chunk kernel and the scan (the final state into `final`); `written`
    is what each token writes (u − w·S), `states` the state each chunk starts from, `decays` G
    (`stored_log_decays`)."""
    w, written = (shape.scratch(shape.length, d, device=k.device) for d in (shape.dk, shape.dv))
    states = shape.scratch(shape.n_chunks, shape.dk, shape.dv, device=k.device, dtype=shape.state_dtype)
    decays = shape.scratch(2, shape.length, device=k.device)
    bh = shape.batch * shape.heads
    launch(_intra_chunk_kernel, (shape.n_chunks, bh), ("gated_delta.intra",),
           k, v, g, beta, w, written, decays, *shape.common(), eps, *k.stride()[:3], *v.stride()[:3], *g.stride(),
           *beta.stride(), BLOCK_V=max(16, next_pow2(shape.dv)), num_warps=4 if shape.block_k <= 128 else 8,
           **shape.constexprs(l2norm))
    launch(_state_scan_kernel, (cdiv(shape.dv, shape.scan_block_v), bh), ("gated_delta.scan",),
           k, decays, w, written, states, initial_state, final, *shape.common(), shape.n_chunks, eps,
           *k.stride()[:3], HAS_INITIAL=initial_state is not None, BLOCK_V=shape.scan_block_v, num_warps=4,
           num_stages=SCAN_STAGES,
           **shape.constexprs(l2norm))
    return w, written, states, decays


def chunk_forward(q, k, v, g, beta, initial_state, scale: float, l2norm: bool, eps: float, out: torch.Tensor,
                  final: torch.Tensor) -> None:
    """Write o into `out` ([B, T, Hv, Dv], contiguous) and the final state into `final` (float32)."""
    shape = Geometry.of(q, v)
    _, written, states, decays = chunk_states(shape, k, v, g, beta, initial_state, l2norm, eps, final)
    launch(_output_kernel, (shape.n_chunks, cdiv(shape.dv, shape.output_block_v), shape.batch * shape.heads),
           ("gated_delta.output",), q, k, decays, states, written, out, *shape.common(), shape.n_chunks, scale,
           eps, *q.stride()[:3], *k.stride()[:3], BLOCK_V=shape.output_block_v, num_warps=4,
           **shape.constexprs(l2norm))
