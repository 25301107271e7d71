"""Host side of the kernels: what a call means in kernel terms (a plan), then its stages' launches.

Everything but the tensors' addresses and the dropout seed follows from shapes, strides, dtypes
and literals, so it is worked out once per such signature (a plan) and reused: for small
problems the host time per call is the whole time. Each kernel is launched by one named stage
whose arguments are keywords; the stage passes them to the kernel in its own order.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..runtime import KernelLimits, cdiv, interpreting, launch, next_pow2, use_triton
from .backward import attention_dkdv_kernel, attention_dq_kernel, backward_preprocess_kernel
from .forward import attention_forward_kernel, merge_splits_kernel, output_strides
from .reference import FLT_MAX, MASKINGS, AttentionLiterals, log2_units, saturation_lse
from .tiles import HeadBlocks, Numerics, ScoreRule, class_cell, class_strides, classify_tiles

MAX_PLANS = 4096


@dataclass(frozen=True)
class AttentionLimits(KernelLimits):
    """q, k and v share one dtype; masks are bool or floating and get no gradient; scores, softmax and
    accumulation are float32."""
    max_head_dim: int = 256  # q/k and v head dims
    scale: tuple[float, float] = (0.0, math.inf)  # open interval
    softcap: tuple[float, float] = (0.0, math.inf)  # [0, inf): 0 is no softcap
    dropout_p: tuple[float, float] = (0.0, 1.0)  # [0, 1)
    mask_gradient: bool = False

    def literals_supported(self, literals: AttentionLiterals) -> bool:
        """Whether the kernels take these literals (the others run the reference)."""
        return (self.scale[0] < literals.scale < self.scale[1] and self.softcap[0] <= literals.softcap < self.softcap[1]
                and self.dropout_p[0] <= literals.dropout_p < self.dropout_p[1])


LIMITS = AttentionLimits()


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


def kernels_support(q, k, v, mask, literals: AttentionLiterals) -> bool:
    """Whether the Triton kernels compute this call (else the ops run the reference)."""
    dtypes_ok = q.dtype in LIMITS.dtypes and k.dtype == q.dtype and v.dtype == q.dtype
    mask_ok = mask is None or mask.dtype == torch.bool or mask.dtype.is_floating_point
    # tile offsets inside one head are 32-bit
    extents_ok = all(t.shape[2] * abs(t.stride(2)) < 2**31 for t in (q, k, v))
    return (use_triton(q, k, v, mask) and dtypes_ok and mask_ok and extents_ok
            and 0 < k.shape[2] and max(q.shape[3], v.shape[3]) <= LIMITS.max_head_dim
            and LIMITS.literals_supported(literals))


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
    constexprs: dict  # the flags every kernel of the forward and backward takes
    sizes: tuple  # Hq, group, Lq, Lk, D, Dv
    literals: tuple  # pos_offset, window, scale, softcap, mask_value_log2, saturation_lse, dropout_p, seed (0)
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

    def seeded(self, seed: torch.Tensor | None) -> tuple:
        """The literals with the dropout seed of this call."""
        return self.literals if seed is None else (*self.literals[:-1], int(seed.item()))


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


def build_plan(q, k, v, mask, literals: AttentionLiterals) -> Plan | None:
    """The plan of a call, None where the kernels do not take it (ValueError: the op is not defined)."""
    check_arguments(q, k, v, mask, literals.masking)
    if not kernels_support(q, k, v, mask, literals):
        return None
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    window = max(int(literals.window), 0)
    pos_offset = lk - lq if literals.bottom_right else 0
    expanded = kernel_mask(mask, b, hq, lq, lk) if mask is not None else None
    pack = group > 1 and lq < 64
    rows = group * lq if pack else lq
    # 32 at least: Triton 3.6 on the H100 reads past shared memory in the masked tiles' p·v dot with 16-wide
    # V blocks (compute-sanitizer, tiny DeepSeek-V3: Dv 16, causal + padding mask)
    block_d, block_dv = max(32, next_pow2(d)), max(32, next_pow2(dv))
    fp32_exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    constexprs = dict(
        HEAD=HeadBlocks(block_d, block_dv, block_d != d, block_dv != dv), CELL=class_cell(),
        RULE=ScoreRule(bool(literals.causal), window > 0, mask_kind, literals.masking == "add", literals.softcap > 0,
                       literals.dropout_p > 0),
        CAN_SKIP=bool(literals.causal) or window > 0 or mask is not None, ZERO_EMPTY_ROWS=literals.masking == "sdpa",
        NUMERICS=Numerics(interpreting(), "ieee" if fp32_exact else "tf32"))
    return Plan(
        constexprs=constexprs, sizes=(hq, group, lq, lk, d, dv),
        literals=(pos_offset, window, float(literals.scale), float(literals.softcap), log2_units(literals.mask_value),
                  saturation_lse(literals.mask_value, literals.masking), float(literals.dropout_p), 0),
        mask_strides=expanded.stride() if expanded is not None else (0, 0, 0, 0),
        is_bool_mask=mask is not None and mask.dtype == torch.bool, out_strides=output_strides(q, dv),
        pack_gqa=pack, splits=_split_count(rows, b * (hkv if pack else hq), lk, q.device),
        keys=(next_pow2(lq), next_pow2(lk)))


def _class_map(classes: torch.Tensor, placeholder: torch.Tensor) -> tuple:
    """(tile classes, their strides) as the kernels take them (the stages' `classes`): without a map any tensor
    stands in (it is never read)."""
    return (classes if classes.numel() else placeholder), class_strides(classes)


def _forward_stage(plan: Plan, *, q, k, v, mask, classes, out, stats, out_strides, stats_strides, literals,
                   pack: bool, splits: int, use_classes: bool):
    """`attention_forward_kernel` over (row blocks, batch × heads in grid, splits); with splits, out/stats are
    the partial buffers and their strides lead with the split's."""
    hq, group, lq = plan.sizes[:3]
    heads_in_grid = hq // group if pack else hq
    rows = group * lq if pack else lq
    launch(attention_forward_kernel, lambda meta: (cdiv(rows, meta["BLOCK_M"]), q.shape[0] * heads_in_grid, splits),
           ("attention.forward", id(plan), pack, splits),
           q, k, v, mask, classes[0], out, stats, q.stride(), k.stride(), v.stride(), plan.mask_strides, classes[1],
           out_strides, stats_strides, heads_in_grid, plan.sizes, literals,
           next_pow2(rows), plan.keys[1], **{**plan.constexprs, "USE_CLASSES": use_classes, "PACK_GQA": pack})


def _merge_stage(plan: Plan, *, q, k, v, mask, classes, out, stats, part_out, part_stats, literals, pack: bool):
    """`merge_splits_kernel`: the splits' partial softmaxes into out and stats."""
    hq, group, lq = plan.sizes[:3]
    heads_in_grid = hq // group if pack else hq
    block_m = 16 if interpreting() else 32
    flags = {key: value for key, value in plan.constexprs.items() if key != "CAN_SKIP"}
    launch(merge_splits_kernel, (cdiv(group * lq if pack else lq, block_m), q.shape[0] * heads_in_grid),
           ("attention.merge", id(plan), pack, part_out.shape[0]),
           q, k, v, mask, classes[0], out, stats, part_out, part_stats, q.stride(), k.stride(), v.stride(),
           plan.mask_strides, classes[1], out.stride(), stats.stride()[:3], part_out.stride(),
           part_stats.stride()[:4], part_out.shape[0], heads_in_grid, plan.sizes, literals,
           BLOCK_M=block_m, BLOCK_N=16 if interpreting() else 64, PACK_GQA=pack, num_warps=4, num_stages=1, **flags)


def forward(plan: Plan, q, k, v, mask, seed, num_splits: int | None = None, pack_gqa: bool | None = None):
    """(out, row statistics [B, Hq, Lq, 2] float32, tile classes) of `fuser::attention`.

    A row's log-sum-exp of the scores, in log2 units, is stats[..., 0] + stats[..., 1]. num_splits and
    pack_gqa override the plan's choice (tests reach the decode paths with them).
    """
    b = q.shape[0]
    hq, group, lq, lk, d, dv = plan.sizes
    out = torch.empty_strided((b, hq, lq, dv), plan.out_strides, dtype=q.dtype, device=q.device)
    stats = torch.empty((b, hq, lq, 2), dtype=torch.float32, device=q.device)
    expanded = kernel_mask(mask, b, hq, lq, lk) if mask is not None else q
    if mask is not None:
        causal, window = plan.constexprs["RULE"].causal, plan.literals[1]
        classes = classify_tiles(expanded, plan.is_bool_mask, lq, lk, plan.literals[0], causal, window)
    else:
        classes = q.new_empty(0, dtype=torch.int8)
    if out.numel() == 0:
        return out, stats, classes
    pack = plan.pack_gqa if pack_gqa is None else pack_gqa
    splits = num_splits or plan.splits
    inputs = dict(q=q, k=k, v=v, mask=expanded, classes=_class_map(classes, q), literals=plan.seeded(seed))
    if splits == 1:
        _forward_stage(plan, **inputs, out=out, stats=stats, out_strides=(0, *out.stride()),
                       stats_strides=(0, *stats.stride()[:3]), pack=pack, splits=1,
                       use_classes=mask is not None and not pack)
        return out, stats, classes
    part_out = q.new_empty(splits, b, hq, lq, dv, dtype=torch.float32)
    part_stats = q.new_empty(splits, b, hq, lq, 2, dtype=torch.float32)
    _forward_stage(plan, **inputs, out=part_out, stats=part_stats, out_strides=part_out.stride(),
                   stats_strides=part_stats.stride()[:4], pack=pack, splits=splits,
                   use_classes=mask is not None and not pack)
    _merge_stage(plan, **inputs, out=out, stats=stats, part_out=part_out, part_stats=part_stats, pack=pack)
    return out, stats, classes


def _preprocess_stage(plan: Plan, *, out, grad_out, stats, delta, head_flags):
    """Δ = rowsum(dO ∘ O) per row, and the heads holding rows that skipping would change."""
    hq, lq = plan.sizes[0], plan.sizes[2]
    block_m = 16 if interpreting() else 64
    launch(backward_preprocess_kernel, (cdiv(lq, block_m), out.shape[0] * hq), ("attention.preprocess", id(plan)),
           out, grad_out, stats, delta, head_flags, out.stride(), grad_out.stride(), hq, lq, plan.sizes[5],
           plan.literals[5], CAN_SKIP=plan.constexprs["CAN_SKIP"], BLOCK_M=block_m,
           BLOCK_DV=plan.constexprs["HEAD"].block_dv, num_warps=4)


def _dkdv_stage(plan: Plan, *, q, k, v, mask, classes, grad_out, stats, delta, head_flags, dk, dv, literals):
    """dK and dV, one program per key block and KV head."""
    hkv = plan.sizes[0] // plan.sizes[1]
    launch(attention_dkdv_kernel, lambda meta: (cdiv(plan.sizes[3], meta["BLOCK_N"]), q.shape[0] * hkv),
           ("attention.dkdv", id(plan)), q, k, v, mask, classes[0], grad_out, stats, delta, head_flags, dk, dv,
           q.stride(), k.stride(), v.stride(), plan.mask_strides, classes[1], grad_out.stride(),
           dk.stride(), dv.stride(), hkv, plan.sizes, literals, *plan.keys, **plan.backward_constexprs)


def _dq_stage(plan: Plan, *, q, k, v, mask, classes, grad_out, stats, delta, dq, dmask, literals):
    """dQ (and dS into dmask when it is not empty), one program per query block and query head."""
    mask_grad = dmask.numel() > 0
    launch(attention_dq_kernel, lambda meta: (cdiv(plan.sizes[2], meta["BLOCK_M"]), q.shape[0] * plan.sizes[0]),
           ("attention.dq", id(plan), mask_grad), q, k, v, mask, classes[0], grad_out, stats, delta, dq,
           dmask if mask_grad else dq, q.stride(), k.stride(), v.stride(), plan.mask_strides, classes[1],
           grad_out.stride(), dq.stride(), dmask.stride() if mask_grad else (0, 0, 0, 0), plan.sizes, literals,
           *plan.keys, MASK_GRAD=mask_grad, **plan.backward_constexprs)


def backward(plan: Plan, grad_out, q, k, v, mask, out, stats, classes, seed, mask_grad: bool = False):
    """(dq, dk, dv, dS) of `fuser::attention` from the forward's output, row statistics and tile classes; dS, the
    gradient of the scores a float mask is added to ([B, Hq, Lq, Lk] float32), only with mask_grad (else empty)."""
    b = q.shape[0]
    hq, group, lq, lk, d, dv = plan.sizes
    dq, dk, dv_out = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dmask = q.new_zeros((b, hq, lq, lk) if mask_grad else (0,), dtype=torch.float32)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv_out.zero_(), dmask
    delta = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    # which heads have saturated rows (tiles.py): only kernels that skip tiles read it
    head_flags = torch.zeros(b * hq, dtype=torch.int32, device=q.device) if plan.constexprs["CAN_SKIP"] else delta
    _preprocess_stage(plan, out=out, grad_out=grad_out, stats=stats, delta=delta, head_flags=head_flags)
    inputs = dict(q=q, k=k, v=v, mask=kernel_mask(mask, b, hq, lq, lk) if mask is not None else q,
                  classes=_class_map(classes, q), grad_out=grad_out, stats=stats, delta=delta,
                  literals=plan.seeded(seed))
    _dkdv_stage(plan, **inputs, head_flags=head_flags, dk=dk, dv=dv_out)
    _dq_stage(plan, **inputs, dq=dq, dmask=dmask)
    return dq, dk, dv_out, dmask
