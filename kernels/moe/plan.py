"""The routing plan: every (token, k) row sorted by expert, on the GPU, without a host sync.

A counting sort replaces `torch.sort` + `bincount`: its buffers are sized from shapes alone, so the
plan is CUDA-graph safe and `torch.compile` sees no data-dependent shape. Up to FUSED_ROWS rows it is
one launch (each program histograms all rows itself, then scatters its chunk: under CUDA graphs a
launch costs more than re-reading a few thousand ids from L2); above, two (per-chunk histograms;
then per chunk, a prefix over the histograms and the scatter). The sort is
stable (rows of an expert keep their (token, k) order), so the weight gradients, which sum over
rows, are deterministic.

Segments are not padded: a GEMM tile of BLOCK_M rows never crosses into the next expert because
the plan lists, per tile, its expert and first row (`tile_expert`, `tile_row_start`); rows past
the expert's end are masked. The tile list is long enough for the worst case,
R // BLOCK_M + min(E, R) tiles; unused entries have expert -1.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..runtime import cdiv, interpreting, launch, next_pow2

# One chunk's one-hot is CHUNK x E_POW2 int32, between these many elements; chunks grow with the rows so
# that each program's prefix over all chunks stays short.
_ONEHOT_ELEMENTS = (8192, 32768)
_TARGET_CHUNKS = 128
FUSED_ROWS = 16384  # one launch up to here: each program reads all R ids (R * 8 bytes, from L2)
_SCAN_ROWS = 1024  # ids a program histograms at a time in the one-launch plan (64 under the interpreter: tests
# then cover several blocks)


@dataclass(frozen=True)
class PlanLayout:
    """Where each part of the packed int32 plan lives; a function of shapes only."""

    rows: int  # R = tokens * top_k
    experts: int
    block_m: int

    @property
    def max_tiles(self) -> int:
        return self.rows // self.block_m + min(self.experts, self.rows)

    @property
    def size(self) -> int:
        return self.rows + self.experts + 1 + 2 * self.max_tiles

    def split(self, plan: torch.Tensor):
        """(sorted_rows [R], expert_offsets [E+1], tile_expert [tiles], tile_row_start [tiles])."""
        return torch.split(plan, [self.rows, self.experts + 1, self.max_tiles, self.max_tiles])


def _chunk_sizes(rows: int, experts: int):
    """(E_POW2, CHUNK rows per program, warps)."""
    e_pow2 = next_pow2(experts)
    smallest, largest = (max(16, elements // e_pow2) for elements in _ONEHOT_ELEMENTS)
    chunk = min(largest, max(smallest, next_pow2(cdiv(rows, _TARGET_CHUNKS))))
    return e_pow2, chunk, 8 if chunk > smallest else 4


# The kernels load the ids themselves, never through a helper given ids_ptr: Inductor's mutation analysis of a
# traced launch follows a store's pointer back through helper calls, and a slot computed from what a helper given
# ids_ptr returned would count the ids as written (cloned before every call). scripts/compile_for_gpu.py checks it.

@triton.jit
def _onehot(ids, E, E_POW2: tl.constexpr):
    """Ids [CHUNK] as their experts one-hot [CHUNK, E_POW2] (ids outside [0, E) drop out)."""
    experts = tl.arange(0, E_POW2)
    return ((ids[:, None] == experts[None, :]) & (ids[:, None] < E)).to(tl.int32)


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, R, E, CHUNK: tl.constexpr, E_POW2: tl.constexpr):
    chunk = tl.program_id(0)
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    onehot = _onehot(tl.load(ids_ptr + rows, mask=rows < R, other=-1).to(tl.int32), E, E_POW2)
    tl.store(chunk_counts_ptr + chunk * E_POW2 + tl.arange(0, E_POW2), tl.sum(onehot, 0))


@triton.jit
def _expert_bins(h, E_POW2: tl.constexpr, BINS: tl.constexpr):
    """The first E_POW2 of a histogram's BINS bins (the rest hold the rows of no expert)."""
    parts = tl.reshape(h, [BINS // E_POW2, E_POW2])
    return tl.sum(tl.where(tl.arange(0, BINS // E_POW2)[:, None] == 0, parts, 0), 0)


@triton.jit
def _place_kernel(
    ids_ptr, chunk_counts_ptr, plan_ptr, R, E, num_chunks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_POW2: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr, COUNTED: tl.constexpr,
):
    """Per chunk: the per-expert counts of all chunks (COUNTED: each program re-reads the count kernel's
    per-chunk counts, no serial scan launch; else it histograms all rows itself), then its rows' slots; and
    a share of the expert offsets and the tile list."""
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    if COUNTED:
        counts = tl.zeros([E_POW2], dtype=tl.int32)
        before = tl.zeros([E_POW2], dtype=tl.int32)  # rows of each expert in earlier chunks
        for first in range(0, num_chunks, SCAN_BLOCK):
            chunks = first + tl.arange(0, SCAN_BLOCK)
            block = tl.load(chunk_counts_ptr + chunks[:, None] * E_POW2 + experts[None, :],
                            mask=chunks[:, None] < num_chunks, other=0)
            counts += tl.sum(block, 0)
            before += tl.sum(tl.where(chunks[:, None] < chunk, block, 0), 0)
    else:  # over all R rows, by histograms: ids outside [0, E) and rows past R land in bin E_POW2, read by none
        BINS: tl.constexpr = 2 * E_POW2 if 2 * E_POW2 > 32 else 32
        counts = tl.zeros([E_POW2], dtype=tl.int32)
        before = tl.zeros([E_POW2], dtype=tl.int32)
        for first in range(0, R, SCAN_BLOCK):
            scanned = first + tl.arange(0, SCAN_BLOCK)
            ids = tl.load(ids_ptr + scanned, mask=scanned < R, other=-1)
            key = tl.where((ids >= 0) & (ids < E), ids, E_POW2).to(tl.int32)
            counts += _expert_bins(tl.histogram(key, BINS), E_POW2, BINS)
            before += _expert_bins(tl.histogram(tl.where(scanned < chunk * CHUNK, key, E_POW2), BINS), E_POW2, BINS)
    expert_end = tl.cumsum(counts, 0)
    expert_start = expert_end - counts

    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    onehot = _onehot(tl.load(ids_ptr + rows, mask=rows < R, other=-1).to(tl.int32), E, E_POW2)
    rank_in_chunk = tl.sum(onehot * (tl.cumsum(onehot, 0) - onehot), 1)
    slot = tl.sum(onehot * (expert_start + before)[None, :], 1) + rank_in_chunk
    tl.store(plan_ptr + slot, rows, mask=tl.sum(onehot, 1) > 0)

    real = experts < E
    expert_offsets_ptr = plan_ptr + R
    if chunk == 0:
        tl.store(expert_offsets_ptr + experts, expert_start, mask=real)
        tl.store(expert_offsets_ptr + E, tl.sum(counts, 0))
    max_tiles = R // BLOCK_M + tl.minimum(E, R)
    tile_expert_ptr = expert_offsets_ptr + E + 1
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    tile = chunk * TILES_PER_PROGRAM + tl.arange(0, TILES_PER_PROGRAM)
    # tile_end is non-decreasing: the experts that end at or before a tile are those before its own
    expert = tl.sum(((tile_end[None, :] <= tile[:, None]) & real[None, :]).to(tl.int32), 1)
    own = experts[None, :] == expert[:, None]
    first_row = tl.sum(tl.where(own, expert_start[None, :], 0), 1)
    first_tile = tl.sum(tl.where(own, (tile_end - tiles)[None, :], 0), 1)
    used = expert < E
    tl.store(tile_expert_ptr + tile, tl.where(used, expert, -1), mask=tile < max_tiles)
    tl.store(tile_expert_ptr + max_tiles + tile, tl.where(used, first_row + (tile - first_tile) * BLOCK_M, 0),
             mask=tile < max_tiles)


def build_plan(topk_ids: torch.Tensor, experts: int, block_m: int, fused: bool | None = None) -> torch.Tensor:
    """The packed int32 plan (see PlanLayout) for topk_ids [T, K], with Triton: one launch (`fused`; by default
    up to FUSED_ROWS rows), else two."""
    layout = PlanLayout(topk_ids.numel(), experts, block_m)
    fused = layout.rows <= FUSED_ROWS if fused is None else fused
    ids = topk_ids.reshape(-1)
    plan = torch.empty(layout.size, dtype=torch.int32, device=ids.device)
    e_pow2, chunk, warps = _chunk_sizes(layout.rows, experts)
    num_chunks = cdiv(layout.rows, chunk)
    chunk_counts = torch.empty(0 if fused else num_chunks * e_pow2, dtype=torch.int32, device=ids.device)
    if num_chunks and not fused:
        launch(_count_kernel, (num_chunks,), ("moe.count", layout.rows, experts),
               ids, chunk_counts, layout.rows, experts, chunk, e_pow2, num_warps=warps)
    programs = max(1, num_chunks)  # with no rows, one program still writes the (empty) offsets
    tiles_per_program = next_pow2(cdiv(layout.max_tiles, programs))
    scan_block = (64 if interpreting() else _SCAN_ROWS) if fused else max(1, _ONEHOT_ELEMENTS[0] // e_pow2)
    launch(
        _place_kernel, (programs,), ("moe.place", layout.rows, experts, fused),
        ids, chunk_counts, plan, layout.rows, experts, num_chunks, block_m, chunk, e_pow2,
        scan_block, tiles_per_program, not fused, num_warps=warps,
    )
    return plan


def build_plan_reference(topk_ids: torch.Tensor, experts: int, block_m: int) -> torch.Tensor:
    """The same plan in plain torch. Rows with an id outside [0, E) sort last (the kernel leaves that tail unset)."""
    layout = PlanLayout(topk_ids.numel(), experts, block_m)
    ids = topk_ids.reshape(-1).long()
    key = torch.where((ids >= 0) & (ids < experts), ids, experts)
    sorted_rows = torch.sort(key, stable=True).indices
    counts = torch.zeros(experts + 1, dtype=torch.long, device=ids.device).index_add_(0, key, torch.ones_like(key))
    counts = counts[:experts]
    expert_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    tiles = (counts + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    tile = torch.arange(layout.max_tiles, device=ids.device)
    expert = torch.searchsorted(tile_end, tile, right=True)
    used = expert < experts
    safe = expert.clamp(max=experts - 1)
    row_start = expert_offsets[safe] + (tile - (tile_end - tiles)[safe]) * block_m
    tile_expert = torch.where(used, expert, -1)
    tile_row_start = torch.where(used, row_start, 0)
    return torch.cat([sorted_rows, expert_offsets, tile_expert, tile_row_start]).to(torch.int32)
