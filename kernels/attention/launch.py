"""Host side of the kernels: what a call means in kernel terms, grids, buffers and launches."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .._common import interpreting
from .backward import attention_dkdv_kernel, attention_dq_kernel, backward_preprocess_kernel
from .forward import _merge_splits_kernel, attention_forward_kernel, output_like
from .tiles import SATURATION_MARGIN, class_cell, class_strides, classify_tiles

FLT_MAX = torch.finfo(torch.float32).max
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def kernels_support(q, k, v, mask, scale, softcap, dropout_p) -> bool:
    """Whether the Triton kernels compute this call (else the ops run the reference)."""
    from .._common import use_triton
    dtypes_ok = q.dtype in KERNEL_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
    mask_ok = mask is None or mask.dtype == torch.bool or mask.dtype.is_floating_point
    # tile offsets inside one head are 32-bit
    extents_ok = all(t.shape[2] * abs(t.stride(2)) < 2**31 for t in (q, k, v))
    return (use_triton(q, k, v, mask) and dtypes_ok and mask_ok and extents_ok
            and 0 < k.shape[2] and max(q.shape[3], v.shape[3]) <= MAX_HEAD_DIM
            and 0 < scale < math.inf and 0 <= softcap < math.inf and 0 <= dropout_p < 1)


def _log2_units(value: float) -> float:
    """A score in log2 units, clamped like the kernels clamp mask values (−inf stays)."""
    if value == -math.inf:
        return value
    return min(max(value * (1 / math.log(2)), -FLT_MAX), FLT_MAX)


def _bucket(n: int) -> int:
    """Autotuning key for a length: its power-of-two bucket (tuned once per bucket, not per length)."""
    return triton.next_power_of_2(max(n, 1))


@dataclass
class Problem:
    """One attention call in the terms the kernels take."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None  # expanded to [B, Hq, Lq, Lk]; bool viewed as uint8, float64 narrowed to float32
    mask_kind: int  # 0 none, 1 bool, 2 float (added)
    scale: float
    causal: bool
    window: int
    pos_offset: int
    softcap: float
    dropout_p: float
    mask_value_log2: float
    seed: int

    @staticmethod
    def build(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value, seed):
        b, hq, lq, _ = q.shape
        lk = k.shape[2]
        mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
        if mask is not None:
            if mask.dtype == torch.float64:  # narrowed, keeping −inf and clamping finite values into float32
                mask = torch.where(mask == -math.inf, mask, mask.clamp(-FLT_MAX, FLT_MAX)).float()
            if mask.dtype == torch.bool:  # the interpreter cannot load bool
                mask = mask.view(torch.uint8)
            mask = mask.expand(b, hq, lq, lk)
        return Problem(q, k, v, mask, mask_kind, float(scale), bool(causal), max(int(window), 0),
                       lk - lq if bottom_right else 0, float(softcap), float(dropout_p), _log2_units(mask_value),
                       0 if seed is None else int(seed.item()))

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def saturation_lse(self) -> float:
        """Rows with lse above this are unchanged by skipped tiles (see tiles.py)."""
        return max(self.mask_value_log2, -FLT_MAX) + SATURATION_MARGIN

    def mask_args(self) -> tuple:
        """The mask (q as a never-read stand-in) and its strides."""
        if self.mask is None:
            return (self.q, 0, 0, 0, 0)
        return (self.mask, *self.mask.stride())

    def scalars(self) -> tuple:
        return (self.pos_offset, self.window, self.scale, self.softcap, self.mask_value_log2, self.saturation_lse,
                self.dropout_p, self.seed)

    def constexprs(self) -> dict:
        fp32 = self.q.dtype == torch.float32
        return dict(
            BLOCK_D=max(16, triton.next_power_of_2(self.q.shape[3])),
            BLOCK_DV=max(16, triton.next_power_of_2(self.v.shape[3])),
            CELL=class_cell(), CAUSAL=self.causal, WINDOWED=self.window > 0, MASK_KIND=self.mask_kind,
            SOFTCAP=self.softcap > 0, DROPOUT=self.dropout_p > 0, UPCAST=interpreting(),
            DOT_PRECISION="ieee" if fp32 and torch.get_float32_matmul_precision() == "highest" else "tf32")


def _split_count(rows: int, programs_per_block_row: int, lk: int, device: torch.device) -> int:
    """Key splits that fill the GPU when there are few row blocks and many keys (decode)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = programs_per_block_row * triton.cdiv(rows, 64)
    if programs >= sms or lk < 1024:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), lk // 512, 64))


def forward(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value, seed,
            num_splits: int | None = None, pack_gqa: bool | None = None):
    """(out, row statistics [B, Hq, Lq, 2] float32, tile classes) of `fuser::attention`.

    A row's log-sum-exp of the scores, in log2 units, is stats[..., 0] + stats[..., 1]."""
    p = Problem.build(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value, seed)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = output_like(q, dv)
    stats = q.new_empty(b, hq, lq, 2, dtype=torch.float32)
    classes = (classify_tiles(p.mask, p.mask_kind == 1, lq, lk, p.pos_offset, p.causal, p.window)
               if p.mask is not None
               else q.new_empty(0, dtype=torch.int8))
    if out.numel() == 0:
        return out, stats, classes
    pack = (p.group > 1 and lq < 64) if pack_gqa is None else pack_gqa
    heads_in_grid = hkv if pack else hq
    rows = p.group * lq if pack else lq
    splits = num_splits or _split_count(rows, b * heads_in_grid, lk, q.device)
    flags = p.constexprs()
    use_classes = p.mask is not None and not pack
    if splits > 1:
        part_out = q.new_empty(splits, b, hq, lq, dv, dtype=torch.float32)
        part_stats = q.new_empty(splits, b, hq, lq, 2, dtype=torch.float32)
        targets = (part_out, part_stats, *part_out.stride(), *part_stats.stride()[:4])
    else:
        targets = (out, stats, 0, *out.stride(), 0, *stats.stride()[:3])
    mask_t, *mask_strides = p.mask_args()
    common = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *class_strides(classes))

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), b * heads_in_grid, splits)

    attention_forward_kernel[grid](
        q, k, v, mask_t, classes, targets[0], targets[1], *common, *targets[2:],
        heads_in_grid, hq, p.group, lq, lk, d, dv, *p.scalars(), _bucket(rows), _bucket(lk),
        USE_CLASSES=use_classes, PACK_GQA=pack, CAN_SKIP=p.causal or p.window > 0 or use_classes, **flags)
    if splits > 1:
        block_m = 16 if interpreting() else 32
        _merge_splits_kernel[(triton.cdiv(rows, block_m), b * heads_in_grid)](
            q, k, v, mask_t, classes, out, stats, part_out, part_stats, *common, *out.stride(), *stats.stride()[:3],
            *part_out.stride(), *part_stats.stride()[:4], splits, heads_in_grid, hq, p.group, lq, lk, d, dv, *p.scalars(),
            BLOCK_M=block_m, BLOCK_N=16 if interpreting() else 64, PACK_GQA=pack, num_warps=4, num_stages=1,
            **flags)
    return out, stats, classes


def backward(grad_out, q, k, v, mask, out, stats, classes, scale, causal, window, bottom_right, softcap, dropout_p,
             mask_value, seed, atomic_dq: bool = False):
    """(dq, dk, dv) of `fuser::attention` from the forward's output, row statistics and tile classes."""
    p = Problem.build(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value, seed)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv_out = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv_out.zero_()
    flags = p.constexprs()
    can_skip = p.causal or p.window > 0 or p.mask is not None
    delta = q.new_empty(b, hq, lq, dtype=torch.float32)
    head_flags = q.new_zeros(b * hq, dtype=torch.int32)
    block_m = 16 if interpreting() else 64
    backward_preprocess_kernel[(triton.cdiv(lq, block_m), b * hq)](
        out, grad_out, stats, delta, head_flags, *out.stride(), *grad_out.stride(), hq, lq, dv, p.saturation_lse,
        CAN_SKIP=can_skip, BLOCK_M=block_m, BLOCK_DV=flags["BLOCK_DV"], num_warps=4)
    mask_t, *mask_strides = p.mask_args()
    common = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *class_strides(classes), *grad_out.stride())
    dq_accumulator = q.new_zeros(b, hq, lq, d, dtype=torch.float32) if atomic_dq else q.new_empty(0)
    dq_strides = dq_accumulator.stride() if atomic_dq else (0, 0, 0, 0)
    attention_dkdv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), b * hkv)](
        q, k, v, mask_t, classes, grad_out, stats, delta, head_flags, dk, dv_out, dq_accumulator, *common,
        *dk.stride(), *dv_out.stride(), *dq_strides, hkv, hq, p.group, lq, lk, d, dv, *p.scalars(),
        _bucket(lq), _bucket(lk), CAN_SKIP=can_skip, ATOMIC_DQ=atomic_dq, **flags)
    if atomic_dq:
        dq.copy_(dq_accumulator * p.scale)
    else:
        attention_dq_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * hq)](
            q, k, v, mask_t, classes, grad_out, stats, delta, dq, *common, *dq.stride(), hq, p.group, lq, lk, d, dv,
            *p.scalars(), _bucket(lq), _bucket(lk), CAN_SKIP=can_skip, **flags)
    return dq, dk, dv_out
