"""Host side of the kernels: what a call means in kernel terms (a plan), then its stages' launches.

Everything but the tensors' addresses and the dropout seed follows from shapes, strides, dtypes
and literals, so it is worked out once per such signature (a plan) and reused: for small
problems the host time per call is the whole time, and traced for Inductor (runtime/ops.py) the
plan is made at trace time, from static shapes. The seed is a tensor the kernels read on the
device; absent operands (mask, tile classes, seed, head flags) are empty tensors, never another
operand (Inductor takes every operand of a kernel as possibly written). Each kernel is launched by
one named stage whose arguments are keywords; the stage passes them to the kernel in its own order,
tuples spread (runtime.flat_kernel).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..runtime import KernelLimits, bounded, cdiv, interpreting, known, launch, next_pow2, program_slots, use_triton
from .backward import attention_dkdv_kernel, attention_dq_kernel, backward_preprocess_kernel
from .forward import attention_forward_kernel, merge_splits_kernel, output_strides
from .reference import FLT_MAX, LOG2E, MASKINGS, AttentionLiterals, log2_units, saturation_lse
from .tiles import HeadBlocks, Numerics, ScoreRule, as_constexprs, class_cell, class_strides, classify_tiles

MAX_PLANS = 4096


@dataclass(frozen=True)
class AttentionLimits(KernelLimits):
    """q, k and v share one dtype; masks are bool or floating, a float mask gets its gradient (a learned bias);
    scores, softmax and accumulation are float32."""
    max_head_dim: int = 256  # q/k and v head dims
    scale: tuple[float, float] = (0.0, math.inf)  # open interval
    softcap: tuple[float, float] = (0.0, math.inf)  # [0, inf): 0 is no softcap
    dropout_p: tuple[float, float] = (0.0, 1.0)  # [0, 1)
    mask_gradient: bool = True

    def literals_supported(self, literals: AttentionLiterals) -> bool:
        """Whether the kernels take these literals (the others run the reference)."""
        return (self.scale[0] < literals.scale < self.scale[1] and self.softcap[0] <= literals.softcap < self.softcap[1]
                and self.dropout_p[0] <= literals.dropout_p < self.dropout_p[1])


LIMITS = AttentionLimits()


def check_arguments(q, k, v, mask, masking, sinks=None):
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
    if sinks is not None and (tuple(sinks.shape) != (hq,) or not sinks.dtype.is_floating_point):
        raise ValueError(f"attention sinks must be floating [Hq] = [{hq}], not {sinks.dtype} {tuple(sinks.shape)}")


def kernels_support(q, k, v, mask, literals: AttentionLiterals, sinks=None) -> bool:
    """Whether the Triton kernels compute this call (else the ops run the reference)."""
    dtypes_ok = q.dtype in LIMITS.dtypes and k.dtype == q.dtype and v.dtype == q.dtype
    mask_ok = mask is None or mask.dtype == torch.bool or mask.dtype.is_floating_point
    # tile offsets inside one head are 32-bit
    extents_ok = all(t.shape[2] * abs(t.stride(2)) < 2**31 for t in (q, k, v))
    return (use_triton(q, k, v, mask, sinks) and dtypes_ok and mask_ok and extents_ok
            and 0 < k.shape[2] and max(q.shape[3], v.shape[3]) <= LIMITS.max_head_dim
            and LIMITS.literals_supported(literals))


def broadcast_strides(t: torch.Tensor, shape: tuple) -> tuple:
    """The strides of t.expand(shape), computed: no expanded view reaches a launch (traced for Inductor, the
    functionalization of a launch replays its operands' views, and failed on expanded ones: torch 2.13)."""
    pad = len(shape) - t.dim()
    return tuple(0 if i < pad or (t.shape[i - pad] == 1 and size != 1) else t.stride(i - pad)
                 for i, size in enumerate(shape))


def kernel_mask(mask: torch.Tensor, b: int, hq: int, lq: int, lk: int) -> tuple[torch.Tensor, tuple]:
    """(the mask as the kernels read it, its strides broadcast to [B, Hq, Lq, Lk]): bool viewed as uint8 under the
    interpreter (which cannot load bool; on the GPU a bool view would fail Inductor's lowering on torch 2.11),
    float64 narrowed to float32 (−inf kept, finite values clamped)."""
    if mask.dtype == torch.float64:
        mask = torch.where(mask == -math.inf, mask, mask.clamp(-FLT_MAX, FLT_MAX)).float()
    if mask.dtype == torch.bool and interpreting():
        mask = mask.view(torch.uint8)
    return mask, broadcast_strides(mask, (b, hq, lq, lk))


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
    literals: tuple  # pos_offset, window, scale, softcap, mask_value_log2, saturation_lse, dropout_p
    is_bool_mask: bool
    out_strides: tuple
    pack_gqa: bool  # forward: the group's query heads share a program's rows
    splits: int  # forward: programs splitting the keys of one row block
    keys: tuple  # autotuning keys: power-of-two buckets of Lq and Lk (tuned once per bucket; tuning_bucket)

    @functools.cached_property
    def kernel_constexprs(self) -> dict:
        """The flags as the kernels take them (tiles.as_constexprs)."""
        return as_constexprs(self.constexprs)

    @functools.cached_property
    def backward_constexprs(self) -> dict:
        """The backward's flags: rows the forward zeroed have statistics that zero them there too."""
        return {key: value for key, value in self.kernel_constexprs.items() if key != "ZERO_EMPTY_ROWS"}


_PLANS: dict[tuple, Plan | None] = {}


def plan_for(key: tuple, build) -> Plan | None:
    """The cached plan of a signature (None: the kernels do not take this call). A signature of symbolic sizes
    (traced for Inductor under dynamic shapes, once per graph) is unhashable (SymInt) and not cached: asking
    costs nothing on the eager path."""
    try:
        cached = key in _PLANS
    except TypeError:
        return build()
    if not cached:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = build()
    return _PLANS[key]


def symbolic_ok(q, k, v) -> bool:
    """Whether the kernels trace this call with its symbolic sizes (ops.py): every size but the head counts and head
    dims may be symbolic (batch, query and key lengths, the mask's, any stride); those choose the blocks."""
    return all(known(n) is not None for n in (q.shape[1], q.shape[3], k.shape[1], v.shape[3]))


def tuning_bucket(n) -> int:
    """The autotuning key of a size: its next power of two; 0 for a symbolic size (the prunes read 0 as any)."""
    return next_pow2(known(n)) if known(n) is not None else 0


# keys a split takes at least: a decode step's program walks its keys one dependent tile after another, so fewer
# keys per program pay (Qwen3 decode on the H200, B4, 640 cached keys, 32 programs: 25 µs a call in one split)
KEYS_PER_SPLIT = 128


def _split_count(rows, programs_per_block_row, lk, device: torch.device):
    """Key splits that fill the GPU when there are few row blocks and many keys (decode). Traced with a
    symbolic batch or key count and a static row count (decode under dynamic shapes), the same count as an
    expression of them, but two at least: the split path is chosen at trace time, once for every value
    (two splits are valid for any length; they cost a merge launch where one split would do); a symbolic row
    count (prefill), or static programs enough to fill the GPU, keep one split."""
    if device.type != "cuda" or known(rows) is None:
        return 1
    sms = program_slots(device)
    programs = programs_per_block_row * cdiv(rows, 64)
    if known(programs) is not None and programs >= sms:
        return 1
    if known(programs) is None or known(lk) is None:
        return bounded(torch.sym_min(cdiv(2 * sms, programs), lk // KEYS_PER_SPLIT), 2, 64)
    return max(1, min(cdiv(2 * sms, programs), lk // KEYS_PER_SPLIT, 64))


def build_plan(q, k, v, mask, literals: AttentionLiterals, sinks=None) -> Plan | None:
    """The plan of a call, None where the kernels do not take it (ValueError: the op is not defined)."""
    check_arguments(q, k, v, mask, literals.masking, sinks)
    if not kernels_support(q, k, v, mask, literals, sinks):
        return None
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    hq, hkv, d, dv = (known(n) for n in (hq, hkv, d, dv))  # ints: symbolic ones are not traced (symbolic_ok)
    group = hq // hkv
    window = max(int(literals.window), 0)
    pos_offset = lk - lq if literals.bottom_right else 0
    pack = group > 1 and known(lq) is not None and known(lq) < 64  # a symbolic Lq: rows of one head (valid for any)
    rows = group * lq if pack else lq
    # 32 at least: Triton 3.6 on the H100 reads past shared memory in the masked tiles' p·v dot with 16-wide
    # V blocks (compute-sanitizer, tiny DeepSeek-V3: Dv 16, causal + padding mask)
    block_d, block_dv = max(32, next_pow2(d)), max(32, next_pow2(dv))
    fp32_exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    constexprs = dict(
        HEAD=HeadBlocks(block_d, block_dv, block_d != d, block_dv != dv), CELL=class_cell(),
        RULE=ScoreRule(bool(literals.causal), window > 0, mask_kind, literals.masking == "add", literals.softcap > 0,
                       literals.dropout_p > 0, sinks is not None),
        CAN_SKIP=bool(literals.causal) or window > 0 or mask is not None, ZERO_EMPTY_ROWS=literals.masking == "sdpa",
        NUMERICS=Numerics(interpreting(), "ieee" if fp32_exact else "tf32"))
    return Plan(
        constexprs=constexprs, sizes=(hq, group, lq, lk, d, dv),
        literals=(pos_offset, window, float(literals.scale), float(literals.softcap), log2_units(literals.mask_value),
                  saturation_lse(literals.mask_value, literals.masking), float(literals.dropout_p)),
        is_bool_mask=mask is not None and mask.dtype == torch.bool, out_strides=output_strides(q, dv),
        pack_gqa=pack, splits=_split_count(rows, b * (hkv if pack else hq), lk, q.device),
        keys=(tuning_bucket(lq), tuning_bucket(lk)))


def _absent(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor where a kernel takes an operand this call does not have (it is never read)."""
    return like.new_empty(0, dtype=dtype)


def _mask_operands(q: torch.Tensor, mask: torch.Tensor | None, lk: int) -> dict:
    """The mask as the kernels take it (kernel_mask), or an empty tensor read nowhere."""
    b, hq, lq, _ = q.shape
    read, strides = (_absent(q, torch.uint8), (0, 0, 0, 0)) if mask is None else kernel_mask(mask, b, hq, lq, lk)
    return dict(mask=read, mask_strides=strides)


def _forward_stage(plan: Plan, *, q, k, v, mask, mask_strides, classes, seed, sinks, out, stats, out_strides, stats_strides,
                   pack: bool, splits: int, use_classes: bool):
    """`attention_forward_kernel` over (row blocks, batch × heads in grid, splits); with splits, out/stats are
    the partial buffers and their strides lead with the split's."""
    hq, group, lq = plan.sizes[:3]
    heads_in_grid = hq // group if pack else hq
    rows = group * lq if pack else lq
    launch(attention_forward_kernel, lambda meta: (cdiv(rows, meta["BLOCK_M"]), q.shape[0] * heads_in_grid, splits),
           ("attention.forward", id(plan), pack, splits),
           q, k, v, mask, classes, seed, sinks, out, stats, *q.stride(), *k.stride(), *v.stride(), *mask_strides,
           *class_strides(classes), *out_strides, *stats_strides, heads_in_grid, *plan.sizes, *plan.literals,
           tuning_bucket(rows), plan.keys[1],
           **{**plan.kernel_constexprs, "USE_CLASSES": use_classes, "PACK_GQA": pack})


def _merge_stage(plan: Plan, *, q, k, v, mask, mask_strides, classes, seed, sinks, out, stats, part_out, part_stats,
                 pack: bool):
    """`merge_splits_kernel`: the splits' partial softmaxes into out and stats."""
    hq, group, lq = plan.sizes[:3]
    heads_in_grid = hq // group if pack else hq
    block_m = 16 if interpreting() else 32
    flags = {key: value for key, value in plan.kernel_constexprs.items() if key != "CAN_SKIP"}
    launch(merge_splits_kernel, (cdiv(group * lq if pack else lq, block_m), q.shape[0] * heads_in_grid),
           ("attention.merge", id(plan), pack, part_out.shape[0]),
           q, k, v, mask, classes, seed, sinks, out, stats, part_out, part_stats, *q.stride(), *k.stride(), *v.stride(),
           *mask_strides, *class_strides(classes), *out.stride(), *stats.stride()[:3], *part_out.stride(),
           *part_stats.stride()[:4], part_out.shape[0], heads_in_grid, *plan.sizes, *plan.literals,
           BLOCK_M=block_m, BLOCK_N=16 if interpreting() else 64, PACK_GQA=pack, num_warps=4, num_stages=1, **flags)


def forward(plan: Plan, q, k, v, mask, seed, sinks=None, num_splits: int | None = None,
            pack_gqa: bool | None = None):
    """(out, row statistics [B, Hq, Lq, 2] float32, tile classes) of `fuser::attention`; `seed` the dropout
    seed tensor (None without dropout), `sinks` the per-head sink logits (or None).

    A row's log-sum-exp of the scores, in log2 units, is stats[..., 0] + stats[..., 1]. num_splits and
    pack_gqa override the plan's choice (tests reach the decode paths with them).
    """
    b = q.shape[0]
    hq, group, lq, lk, d, dv = plan.sizes
    out = torch.empty_strided((b, hq, lq, dv), plan.out_strides, dtype=q.dtype, device=q.device)
    stats = torch.empty((b, hq, lq, 2), dtype=torch.float32, device=q.device)
    masking = _mask_operands(q, mask, lk)
    if mask is not None:
        causal, window = plan.constexprs["RULE"].causal, plan.literals[1]
        classes = classify_tiles(masking["mask"], masking["mask_strides"], (b, hq), plan.is_bool_mask, lq, lk,
                                 plan.literals[0], causal, window)
    else:
        classes = _absent(q, torch.int8)
    if out.numel() == 0:
        return out, stats, classes
    pack = plan.pack_gqa if pack_gqa is None else pack_gqa
    splits = num_splits or plan.splits
    inputs = dict(q=q, k=k, v=v, **masking, classes=classes, seed=_absent(q, torch.int64) if seed is None else seed,
                  sinks=_absent(q, torch.float32) if sinks is None else sinks)
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
           out, grad_out, stats, delta, head_flags, *out.stride(), *grad_out.stride(), hq, lq, plan.sizes[5],
           plan.literals[5], CAN_SKIP=plan.constexprs["CAN_SKIP"], BLOCK_M=block_m,
           BLOCK_DV=plan.constexprs["HEAD"].block_dv, num_warps=4)


def _dkdv_stage(plan: Plan, *, q, k, v, mask, mask_strides, classes, seed, grad_out, stats, delta, head_flags, dk, dv):
    """dK and dV, one program per key block and KV head."""
    hkv = plan.sizes[0] // plan.sizes[1]
    launch(attention_dkdv_kernel, lambda meta: (cdiv(plan.sizes[3], meta["BLOCK_N"]), q.shape[0] * hkv),
           ("attention.dkdv", id(plan)), q, k, v, mask, classes, seed, grad_out, stats, delta, head_flags, dk, dv,
           *q.stride(), *k.stride(), *v.stride(), *mask_strides, *class_strides(classes), *grad_out.stride(),
           *dk.stride(), *dv.stride(), hkv, *plan.sizes, *plan.literals, *plan.keys, **plan.backward_constexprs)


def _dq_stage(plan: Plan, *, q, k, v, mask, mask_strides, classes, seed, grad_out, stats, delta, dq, dscores):
    """dQ, one program per query block and query head; dS into dscores where it is not empty."""
    mask_grad = dscores.numel() > 0
    launch(attention_dq_kernel, lambda meta: (cdiv(plan.sizes[2], meta["BLOCK_M"]), q.shape[0] * plan.sizes[0]),
           ("attention.dq", id(plan), mask_grad), q, k, v, mask, classes, seed, grad_out, stats, delta, dq, dscores,
           *q.stride(), *k.stride(), *v.stride(), *mask_strides, *class_strides(classes), *grad_out.stride(),
           *dq.stride(), *plan.sizes, *plan.literals, *plan.keys, MASK_GRAD=mask_grad, **plan.backward_constexprs)


def mask_gradient(dscores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gradient of a float mask from dS [B, Hq, Lq, Lk] float32: summed over the dims the mask broadcasts on
    (size 1 or missing; in float32), in the mask's shape and dtype."""
    return dscores.sum_to_size(mask.shape).to(mask.dtype)


def backward(plan: Plan, grad_out, q, k, v, mask, out, stats, classes, seed, sinks=None, mask_grad: bool = False):
    """(dq, dk, dv, dsinks, dmask) of `fuser::attention` from the forward's output, row statistics and tile classes
    (dsinks empty without sinks, dmask without mask_grad). The sinks' gradient is −Σ over batch and rows of
    p(sink)·Δ: the sink has no value, so dq, dk and dv are the formula's with statistics that hold it. A float mask's
    is dS where it passes (mask_gradient), which the dQ kernel stores."""
    b = q.shape[0]
    hq, group, lq, lk, d, dv = plan.sizes
    dq, dk, dv_out = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dsinks = _absent(q, torch.float32) if sinks is None else torch.zeros_like(sinks)
    dscores = torch.zeros((b, hq, lq, lk), dtype=torch.float32, device=q.device) if mask_grad \
        else _absent(q, torch.float32)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv_out.zero_(), dsinks, mask_gradient(dscores, mask) if mask_grad else dscores
    delta = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    # which heads have saturated rows (tiles.py): only kernels that skip tiles read it
    head_flags = torch.zeros(b * hq, dtype=torch.int32, device=q.device) if plan.constexprs["CAN_SKIP"] \
        else _absent(q, torch.int32)
    _preprocess_stage(plan, out=out, grad_out=grad_out, stats=stats, delta=delta, head_flags=head_flags)
    inputs = dict(q=q, k=k, v=v, **_mask_operands(q, mask, lk), classes=classes,
                  seed=_absent(q, torch.int64) if seed is None else seed, grad_out=grad_out,
                  stats=stats, delta=delta)
    _dkdv_stage(plan, **inputs, head_flags=head_flags, dk=dk, dv=dv_out)
    _dq_stage(plan, **inputs, dq=dq, dscores=dscores)
    if sinks is not None:
        shift, log2_sum = stats.unbind(-1)
        sink_probabilities = torch.exp2(sinks.float().view(1, -1, 1) * LOG2E - shift - log2_sum)
        dsinks = -(sink_probabilities * delta).sum((0, 2)).to(sinks.dtype)
    return dq, dk, dv_out, dsinks, mask_gradient(dscores, mask) if mask_grad else dscores
