"""Host side of the kernels: what a call means in kernel terms, grids, buffers and launches.

Everything but the tensors' addresses and the dropout seed follows from shapes, strides, dtypes
and literals, so it is worked out once per such signature (a plan) and reused: for small
problems the host time per call is the whole time.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..runtime import cdiv, interpreting, launch, next_pow2, use_triton
from .backward import attention_dkdv_kernel, attention_dq_kernel, backward_preprocess_kernel
from .forward import _merge_splits_kernel, attention_forward_kernel, output_strides
from .reference import MASKINGS
from .tiles import SATURATION_MARGIN, class_cell, class_strides, classify_tiles

FLT_MAX = torch.finfo(torch.float32).max
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_PLANS = 4096


def check_arguments(q, k, v, mask, masking):
    """The arguments the op is defined for (the patterns' checks keep everything else out)."""
    if masking not in MASKINGS:
        raise ValueError(f"attention masking {masking!r} is not one of {MASKINGS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention takes q, k, v as [B, H, L, D]")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d or hq % max(k.shape[1], 1) != 0:
        raise ValueError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if mask is not None:
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise ValueError(f"attention mask must be bool or floating, not {mask.dtype}")
        torch.broadcast_shapes(mask.shape, (b, hq, lq, k.shape[2]))


def kernels_support(q, k, v, mask, scale, softcap, dropout_p) -> bool:
    """Whether the Triton kernels compute this call (else the ops run the reference)."""
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


def _saturation_lse(mask_value_log2: float, masking: str) -> float:
    """The log-sum-exp (log2 units) at or below which a row is recomputed without skipping (tiles.py).

    A skipped score is at most skipped_bound = max(mask_value, −FLT_MAX), or score + skipped_bound with
    "add": there half the bound is used, which keeps skipping exact while scores stay below half its size
    (a large negative fill is what the patterns pass)."""
    skipped_bound = max(mask_value_log2, -FLT_MAX)
    if masking == "add":
        return max(skipped_bound + SATURATION_MARGIN, skipped_bound / 2)
    return skipped_bound + SATURATION_MARGIN


def kernel_mask(mask: torch.Tensor | None, b: int, hq: int, lq: int, lk: int) -> torch.Tensor | None:
    """The mask as the kernels read it: an expanded [B, Hq, Lq, Lk] view; bool viewed as uint8 (the
    interpreter cannot load bool), float64 narrowed to float32 (−inf kept, finite values clamped)."""
    if mask is None:
        return None
    if mask.dtype == torch.float64:
        mask = torch.where(mask == -math.inf, mask, mask.clamp(-FLT_MAX, FLT_MAX)).float()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask.expand(b, hq, lq, lk)


def signature(*tensors, literals: tuple) -> tuple:
    """What a plan depends on: shapes, strides, dtypes and devices of the tensors, the literals, the
    interpreter switch and the float32 matmul precision."""
    described = tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)
    return described + (literals, interpreting(), torch.get_float32_matmul_precision())


@dataclass(frozen=True)
class Plan:
    """The parts of a launch that do not depend on the tensors' data."""
    constexprs: dict
    sizes: tuple  # Hq, group, Lq, Lk, D, Dv
    literals: tuple  # pos_offset, window, scale, softcap, mask_value_log2, saturation_lse, dropout_p
    mask_strides: tuple  # of the expanded mask ((0,) * 4 without one)
    is_bool_mask: bool
    out_strides: tuple
    pack_gqa: bool  # forward: the group's query heads share a program's rows
    splits: int  # forward: programs splitting the keys of one row block
    keys: tuple  # autotuning keys: power-of-two buckets of Lq and Lk (tuned once per bucket)

    @functools.cached_property
    def backward_constexprs(self) -> dict:
        """The backward's flags: rows the forward zeroed have statistics that zero them there too."""
        return {key: value for key, value in self.constexprs.items() if key != "ZERO_EMPTY_ROWS"}


_PLANS: dict[tuple, Plan | None] = {}


def plan_for(key: tuple, build) -> Plan | None:
    """The cached plan of a signature (None: the kernels do not take this call)."""
    if key not in _PLANS:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = build()
    return _PLANS[key]


def _split_count(rows: int, programs_per_block_row: int, lk: int, device: torch.device) -> int:
    """Key splits that fill the GPU when there are few row blocks and many keys (decode)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = programs_per_block_row * cdiv(rows, 64)
    if programs >= sms or lk < 1024:
        return 1
    return max(1, min(cdiv(2 * sms, programs), lk // 512, 64))


def build_plan(q, k, v, mask, scale, causal, window, bottom_right, softcap, dropout_p, mask_value,
               masking="fill") -> Plan | None:
    """The plan of a call, None where the kernels do not take it (ValueError: the op is not defined)."""
    check_arguments(q, k, v, mask, masking)
    if not kernels_support(q, k, v, mask, scale, softcap, dropout_p):
        return None
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    window = max(int(window), 0)
    pos_offset = lk - lq if bottom_right else 0
    mask_value_log2 = _log2_units(mask_value)
    expanded = kernel_mask(mask, b, hq, lq, lk) if mask is not None else None
    pack = group > 1 and lq < 64
    rows = group * lq if pack else lq
    # 32 at least: Triton 3.6 on the H100 reads past shared memory in the masked tiles' p·v dot with 16-wide
    # V blocks (compute-sanitizer, tiny DeepSeek-V3: Dv 16, causal + padding mask)
    block_d, block_dv = max(32, next_pow2(d)), max(32, next_pow2(dv))
    can_skip = causal or window > 0 or mask is not None
    fp32_exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    constexprs = dict(
        BLOCK_D=block_d, BLOCK_DV=block_dv, PAD_D=block_d != d, PAD_DV=block_dv != dv, CELL=class_cell(),
        CAUSAL=bool(causal), WINDOWED=window > 0, MASK_KIND=0 if mask is None else 1 if mask.dtype == torch.bool else 2,
        ADD_MASK_VALUE=masking == "add", ZERO_EMPTY_ROWS=masking == "sdpa",
        SOFTCAP=softcap > 0, DROPOUT=dropout_p > 0, UPCAST=interpreting(),
        DOT_PRECISION="ieee" if fp32_exact else "tf32",
        CAN_SKIP=can_skip)
    return Plan(
        constexprs=constexprs, sizes=(hq, group, lq, lk, d, dv),
        literals=(pos_offset, window, float(scale), float(softcap), mask_value_log2,
                  _saturation_lse(mask_value_log2, masking), float(dropout_p)),
        mask_strides=expanded.stride() if expanded is not None else (0, 0, 0, 0),
        is_bool_mask=mask is not None and mask.dtype == torch.bool, out_strides=output_strides(q, dv),
        pack_gqa=pack, splits=_split_count(rows, b * (hkv if pack else hq), lk, q.device),
        keys=(next_pow2(lq), next_pow2(lk)))


def forward(plan: Plan, q, k, v, mask, seed, num_splits: int | None = None, pack_gqa: bool | None = None):
    """(out, row statistics [B, Hq, Lq, 2] float32, tile classes) of `fuser::attention`.

    A row's log-sum-exp of the scores, in log2 units, is stats[..., 0] + stats[..., 1]. num_splits and
    pack_gqa override the plan's choice (tests reach the decode paths with them).
    """
    b = q.shape[0]
    hq, group, lq, lk, d, dv = plan.sizes
    out = torch.empty_strided((b, hq, lq, dv), plan.out_strides, dtype=q.dtype, device=q.device)
    stats = torch.empty((b, hq, lq, 2), dtype=torch.float32, device=q.device)
    pos_offset, window = plan.literals[:2]
    flags = plan.constexprs
    kernel_mask_tensor = kernel_mask(mask, b, hq, lq, lk) if mask is not None else q
    if mask is not None:
        classes = classify_tiles(kernel_mask_tensor, plan.is_bool_mask, lq, lk, pos_offset, flags["CAUSAL"], window)
    else:
        classes = q.new_empty(0, dtype=torch.int8)
    if out.numel() == 0:
        return out, stats, classes
    pack = plan.pack_gqa if pack_gqa is None else pack_gqa
    splits = num_splits or plan.splits
    heads_in_grid = hq // group if pack else hq
    rows = group * lq if pack else lq
    use_classes = mask is not None and not pack
    seed_value = 0 if seed is None else int(seed.item())
    common = (*q.stride(), *k.stride(), *v.stride(), *plan.mask_strides, *class_strides(classes))
    scalars = (heads_in_grid, hq, group, lq, lk, d, dv, *plan.literals, seed_value)
    if splits > 1:
        part_out = q.new_empty(splits, b, hq, lq, dv, dtype=torch.float32)
        part_stats = q.new_empty(splits, b, hq, lq, 2, dtype=torch.float32)
        targets = (part_out, part_stats, *part_out.stride(), *part_stats.stride()[:4])
    else:
        targets = (out, stats, 0, *out.stride(), 0, *stats.stride()[:3])
    class_arg = classes if classes.numel() else q
    launch(
        attention_forward_kernel, lambda meta: (cdiv(rows, meta["BLOCK_M"]), b * heads_in_grid, splits),
        ("attention.forward", id(plan), pack, splits), q, k, v, kernel_mask_tensor, class_arg, *targets[:2], *common,
        *targets[2:], *scalars, next_pow2(rows), plan.keys[1], USE_CLASSES=use_classes, PACK_GQA=pack, **flags)
    if splits > 1:
        block_m = 16 if interpreting() else 32
        launch(
            _merge_splits_kernel, (cdiv(rows, block_m), b * heads_in_grid),
            ("attention.merge", id(plan), pack, splits),
            q, k, v, kernel_mask_tensor, class_arg, out, stats, part_out, part_stats, *common, *out.stride(),
            *stats.stride()[:3], *part_out.stride(), *part_stats.stride()[:4], splits, *scalars,
            BLOCK_M=block_m, BLOCK_N=16 if interpreting() else 64, PACK_GQA=pack, num_warps=4, num_stages=1,
            **{key: value for key, value in flags.items() if key != "CAN_SKIP"})
    return out, stats, classes


def backward(plan: Plan, grad_out, q, k, v, mask, out, stats, classes, seed):
    """(dq, dk, dv) of `fuser::attention` from the forward's output, row statistics and tile classes."""
    b = q.shape[0]
    hq, group, lq, lk, d, dv = plan.sizes
    dq, dk, dv_out = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv_out.zero_()
    flags = plan.backward_constexprs
    delta = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    # which heads have saturated rows (tiles.py): only kernels that skip tiles read it
    head_flags = torch.zeros(b * hq, dtype=torch.int32, device=q.device) if flags["CAN_SKIP"] else delta
    block_m = 16 if interpreting() else 64
    saturation_lse = plan.literals[5]
    launch(
        backward_preprocess_kernel, (cdiv(lq, block_m), b * hq), ("attention.preprocess", id(plan)),
        out, grad_out, stats, delta, head_flags, *out.stride(), *grad_out.stride(), hq, lq, dv, saturation_lse,
        CAN_SKIP=flags["CAN_SKIP"], BLOCK_M=block_m, BLOCK_DV=flags["BLOCK_DV"], num_warps=4)
    mask_arg = kernel_mask(mask, b, hq, lq, lk) if mask is not None else q
    common = (*q.stride(), *k.stride(), *v.stride(), *plan.mask_strides, *class_strides(classes),
              *grad_out.stride())
    scalars = (hq, group, lq, lk, d, dv, *plan.literals, 0 if seed is None else int(seed.item()))
    class_arg = classes if classes.numel() else q
    launch(
        attention_dkdv_kernel, lambda meta: (cdiv(lk, meta["BLOCK_N"]), b * (hq // group)),
        ("attention.dkdv", id(plan)), q, k, v, mask_arg, class_arg, grad_out, stats, delta, head_flags, dk, dv_out,
        *common, *dk.stride(), *dv_out.stride(), hq // group, *scalars, *plan.keys, **flags)
    launch(
        attention_dq_kernel, lambda meta: (cdiv(lq, meta["BLOCK_M"]), b * hq), ("attention.dq", id(plan)),
        q, k, v, mask_arg, class_arg, grad_out, stats, delta, dq, *common, *dq.stride(), *scalars, *plan.keys, **flags)
    return dq, dk, dv_out
