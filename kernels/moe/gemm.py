"""Grouped GEMMs over the expert-sorted rows of a routing plan, with the MoE math in their epilogues.

One row-grouped kernel serves the four products whose rows are (token, k) pairs; a constexpr
EPILOGUE says which:
  GATE_UP  x[token] @ gate[e]^T and @ up[e]^T (+ biases; A read once)  -> w * glu(gate, up)
  DOWN     (w * h) @ down[e]^T (+ w * down bias)                       -> that (token, k) row
  GRAD_H   grad_out[token] @ down[e], times the weight, through glu'   -> d(gate | up); d(weight) partials
  GRAD_X   d(gate) @ gate[e] + d(up) @ up[e]                           -> that (token, k) row of dx
glu is SwiGLU, silu(gate) * up, or (CLAMPED) GPT-OSS's clamped form: gate' = min(gate, limit),
up' = clamp(up, -limit, limit), gate' * sigmoid(alpha * gate') * (up' + 1).
The routing weight w scales h before the down GEMM rather than its output (down is linear): the
DOWN epilogue is a store (plus w times the bias), and d(down) = grad_out^T (w * h) needs no rescaled operand.
A second kernel makes both per-expert weight gradients in one launch, reducing over each expert's rows, and
with biases their gradients (column sums over the same rows, in the tiles of the first column block).
over_topk.py sums the (token, k) rows over k: no atomics, deterministic.

Weights are read in place through their strides (gate/up are usually views of one
[E, 2I, H] tensor). Operands load in their own dtype; everything after the dot is fp32.
Buffers this module allocates are contiguous, so the kernels derive their row strides.
"""
import torch
import triton
import triton.language as tl

from ..language import to_dtype
from ..runtime import autotune, cdiv, interpreting, launch

GATE_UP = tl.constexpr(0)
DOWN = tl.constexpr(1)
GRAD_H = tl.constexpr(2)
GRAD_X = tl.constexpr(3)
# Under the interpreter: upcast dot operands (its bf16 arithmetic is wrong) and use one tiny config.
_UPCAST = tl.constexpr(interpreting())


def _configs(shapes, block_keys, tiny):
    """Hopper autotuning candidates, or one tiny config under the interpreter."""
    if interpreting():
        return [triton.Config(dict(zip(block_keys, tiny)), num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(block_keys, blocks)), num_warps=warps, num_stages=stages)
            for *blocks, warps, stages in shapes]


# (BLOCK_N, BLOCK_K, GROUP_M, warps, stages); BLOCK_M comes from the plan. A sweep of 19 tilings on an H100
# (benchmarks/RESULTS.md, MoE) found the winners among these: deeper pipelines won by 5-7%.
_ROWS_CONFIGS = _configs(
    [(128, 64, 8, 8, 4), (128, 64, 8, 8, 5), (128, 64, 16, 8, 4), (128, 32, 8, 8, 5), (64, 64, 8, 8, 4),
     (64, 64, 8, 4, 4), (128, 64, 8, 4, 4), (256, 64, 8, 8, 4), (256, 64, 8, 8, 3)],
    ("BLOCK_N", "BLOCK_K", "GROUP_M"), (16, 16, 2))
# (BLOCK_P, BLOCK_Q, BLOCK_R, GROUP_P, warps, stages)
_WEIGHT_GRAD_CONFIGS = _configs(
    [(128, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4)],
    ("BLOCK_P", "BLOCK_Q", "BLOCK_R", "GROUP_P"), (16, 16, 16, 2))
# d(weight) partial sums cover this many columns each: the narrowest BLOCK_N of any config
PARTIAL_GRAIN = tl.constexpr(min(config.kwargs["BLOCK_N"] for config in _ROWS_CONFIGS))


def block_m_for(rows: int, experts: int) -> int:
    """Rows per GEMM tile: 64 when experts get few rows (less padding waste), else 128 (at ~512 rows per
    expert, 64-row tiles measured 6-35% slower on an H100: benchmarks/RESULTS.md)."""
    if interpreting():
        return 16
    return 64 if rows < 256 * experts else 128


def dot_precision() -> str:
    """fp32 dots follow torch's matmul precision setting, as the replaced torch.matmul did."""
    if interpreting() or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@triton.jit
def _grouped_tile(pid, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """GROUP_M consecutive row tiles (mostly one expert's) sweep the columns together, so that
    expert's weights and rows are read from L2 rather than memory."""
    tiles_per_group = GROUP_M * num_tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_m = min(num_tiles_m - first_m, GROUP_M)
    return first_m + (pid % tiles_per_group) % group_m, (pid % tiles_per_group) // group_m


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _clamped(gate, up, limit):
    """GPT-OSS's clamps: gate to at most limit, up to [-limit, limit] (NaN stays NaN, as torch.clamp)."""
    return tl.where(gate > limit, limit, gate), tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))


@triton.jit
def glu(gate, up, alpha, limit, CLAMPED: tl.constexpr):
    """The gated activation of fp32 pre-activations: silu(gate) * up, or the clamped form (module docstring)."""
    if CLAMPED:
        gate, up = _clamped(gate, up, limit)
        return gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    return gate * tl.sigmoid(gate) * up


@triton.jit
def glu_grad(grad_h, gate, up, alpha, limit, CLAMPED: tl.constexpr):
    """(d gate, d up, glu(gate, up)) from d(loss)/d(glu); a clamp passes the gradient where its input is within
    its bounds, ends included (torch.clamp's rule)."""
    if CLAMPED:
        gate_c, up_c = _clamped(gate, up, limit)
        sig = tl.sigmoid(alpha * gate_c)
        d_gate = tl.where(gate <= limit, grad_h * (up_c + 1.0) * sig * (1.0 + alpha * gate_c * (1.0 - sig)), 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), grad_h * gate_c * sig, 0.0)
        return d_gate, d_up, gate_c * sig * (up_c + 1.0)
    sig = tl.sigmoid(gate)
    return grad_h * up * sig * (1.0 + gate * (1.0 - sig)), grad_h * gate * sig, gate * sig * up


@triton.jit
def _k_loop(acc, acc2, a_ptrs, b_ptrs, b2_ptrs, stride_b_k, stride_b2_k, n_ok, K,
            TWO_B: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A @ B over K; with TWO_B also acc2 += A @ B2, loading each A tile once."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b_mask = n_ok[None, :]
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & n_ok[None, :]
        acc = _dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, PRECISION)
        if TWO_B:
            acc2 = _dot(a, tl.load(b2_ptrs, mask=b_mask, other=0.0), acc2, PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b_k
        b2_ptrs += BLOCK_K * stride_b2_k
    return acc, acc2


def _tuning_pays(n: int, k: int) -> bool:
    """Small weights (under 2^20 elements: test and toy models) run the first candidate: tuning them
    costs seconds of compiling per candidate and gains nothing measurable."""
    return n * k >= 2**20


def _accumulators_fit(configs, named_args, **kwargs):
    """Keep tiles whose fp32 accumulators take at most 128 registers a thread (GATE_UP holds two):
    larger ones spill in the main loop (seen in the sm_90 SASS)."""
    accumulators = 2 if kwargs["EPILOGUE"] == GATE_UP.value else 1
    fit = [config for config in configs
           if accumulators * kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 128 * 32 * config.num_warps]
    fit = fit or configs[:1]
    return fit if _tuning_pays(named_args["N"], named_args["K"]) else fit[:1]


def _weight_grad_candidates(configs, named_args, **kwargs):
    return configs if _tuning_pays(named_args["P"], named_args["Q"]) else configs[:1]  # d(gate | up): the larger


# Not keyed on HAS_BIAS or CLAMPED: a bias or a clamp adds a few elementwise operations to the epilogue, the
# tiling is the main loop's. Keyed on them, each variant was tuned on its own: swiglu+bias measured 1.17x the
# bias-free forward where clamped+bias, the same work and a clamp more, measured 1.05x (benchmarks/RESULTS.md,
# issue 14), and their separate tunings were the only difference in their forwards' launches
@autotune(_ROWS_CONFIGS, key=["N", "K", "BLOCK_M", "EPILOGUE", "EXTRA_OUTPUT"],
          prune_configs_by={"early_config_prune": _accumulators_fit})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _expert_rows_gemm_kernel(
    plan_ptr, R, E,  # the packed plan of plan.py, for R rows and E experts
    a_ptr, stride_a_row,  # A[row, k], k contiguous; GRAD_X reads d(gate) at columns [0, K), d(up) at [K, 2K)
    b_ptr, stride_b_e, stride_b_k, stride_b_n,  # B[e][k, n]: gate / down as the epilogue needs
    b2_ptr, stride_b2_e, stride_b2_k, stride_b2_n,  # up, for GATE_UP and GRAD_X
    out_ptr,  # [R, N] (GRAD_H: [R, 2N])
    act_ptr,  # gate | up pre-activations [R, 2N]: GATE_UP writes them (EXTRA_OUTPUT), GRAD_H reads them
    routing_weights_ptr,  # [R], read by GATE_UP and GRAD_H
    partials_ptr,  # [R, cdiv(N, PARTIAL_GRAIN)] d(weight) partial sums (GRAD_H with EXTRA_OUTPUT)
    bias_ptr, stride_bias_e, stride_bias_n,  # HAS_BIAS: GATE_UP's gate bias [E, N], DOWN's down bias [E, N]
    bias2_ptr, stride_bias2_e, stride_bias2_n,  # HAS_BIAS: GATE_UP's up bias [E, N]
    alpha, limit,  # the clamped activation's (CLAMPED)
    N, K, TOPK,
    EPILOGUE: tl.constexpr, EXTRA_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of one expert's rows. GATE_UP and GRAD_H read A's rows by token
    (row // TOPK), DOWN and GRAD_X by sorted position; GATE_UP and GRAD_H write in plan order,
    DOWN and GRAD_X at the row's own (token, k) index (and share that epilogue)."""
    max_tiles = R // BLOCK_M + tl.minimum(E, R)
    alpha, limit = tl.cast(alpha, tl.float32), tl.cast(limit, tl.float32)  # Inductor passes Python floats as fp64
    tile_expert_ptr = plan_ptr + R + E + 1
    tile_m, tile_n = _grouped_tile(tl.program_id(0), max_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile_m)
    if expert < 0:
        return
    row_start = tl.load(tile_expert_ptr + max_tiles + tile_m)
    row_end = tl.load(plan_ptr + R + expert + 1)
    pos = row_start + tl.arange(0, BLOCK_M)
    row_ok = pos < row_end
    pos = tl.where(row_ok, pos, row_start)  # rows past the segment redo its first row; dropped at the end
    row_id = tl.load(plan_ptr + pos)  # token * TOPK + k
    if EPILOGUE == GATE_UP or EPILOGUE == GRAD_H:
        a_row = (row_id // TOPK).to(tl.int64)
    else:
        a_row = pos.to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_a_row + offs_k[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_b_e + offs_k[:, None] * stride_b_k + offs_n[None, :] * stride_b_n
    b2_ptrs = b2_ptr + expert.to(tl.int64) * stride_b2_e + offs_k[:, None] * stride_b2_k + offs_n[None, :] * stride_b2_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EPILOGUE == GATE_UP:
        acc, acc2 = _k_loop(acc, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, b_ptrs, b2_ptrs,
                            stride_b_k, stride_b2_k, n_ok, K, True, BLOCK_K, EVEN_K, PRECISION)
    elif EPILOGUE == GRAD_X:  # d(gate) @ gate then d(up) @ up into one accumulator
        acc, _ = _k_loop(acc, acc, a_ptrs, b_ptrs, b_ptrs, stride_b_k, 0, n_ok, K, False, BLOCK_K, EVEN_K, PRECISION)
        acc, _ = _k_loop(acc, acc, a_ptrs + K, b2_ptrs, b2_ptrs, stride_b2_k, 0, n_ok, K, False, BLOCK_K, EVEN_K,
                         PRECISION)
    else:
        acc, _ = _k_loop(acc, acc, a_ptrs, b_ptrs, b_ptrs, stride_b_k, 0, n_ok, K, False, BLOCK_K, EVEN_K, PRECISION)

    keep = row_ok[:, None] & n_ok[None, :]
    pos64 = pos.to(tl.int64)[:, None]
    act = act_ptr + pos64 * (2 * N) + offs_n[None, :]
    out_ty = out_ptr.dtype.element_ty
    if HAS_BIAS and (EPILOGUE == GATE_UP or EPILOGUE == DOWN):
        bias_at = expert.to(tl.int64) * stride_bias_e + offs_n * stride_bias_n
        bias = tl.load(bias_ptr + bias_at, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == GATE_UP:
        if HAS_BIAS:
            acc += bias
            acc2 += tl.load(bias2_ptr + expert.to(tl.int64) * stride_bias2_e + offs_n * stride_bias2_n, mask=n_ok,
                            other=0.0).to(tl.float32)[None, :]
        weight = tl.load(routing_weights_ptr + row_id).to(tl.float32)[:, None]
        tl.store(out_ptr + pos64 * N + offs_n[None, :], to_dtype(weight * glu(acc, acc2, alpha, limit, CLAMPED),
                                                                 out_ty), mask=keep)
        if EXTRA_OUTPUT:
            tl.store(act, to_dtype(acc, act_ptr.dtype.element_ty), mask=keep)
            tl.store(act + N, to_dtype(acc2, act_ptr.dtype.element_ty), mask=keep)
    elif EPILOGUE == GRAD_H:  # acc = d(loss)/d(h) before the routing weight
        gate = tl.load(act, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(act + N, mask=keep, other=0.0).to(tl.float32)
        grad_h = acc * tl.load(routing_weights_ptr + row_id).to(tl.float32)[:, None]
        d_gate, d_up, h = glu_grad(grad_h, gate, up, alpha, limit, CLAMPED)
        grad_act = out_ptr + pos64 * (2 * N) + offs_n[None, :]
        tl.store(grad_act, to_dtype(d_gate, out_ty), mask=keep)
        tl.store(grad_act + N, to_dtype(d_up, out_ty), mask=keep)
        if EXTRA_OUTPUT:  # d(weight) = grad_out . (down @ h) = (grad_out @ down) . h, in sums of PARTIAL_GRAIN
            # columns: every config writes every partial, so autotuning leaves no stale one behind
            grains_per_tile: tl.constexpr = BLOCK_N // PARTIAL_GRAIN
            partial = tl.sum(tl.reshape(acc * h, (BLOCK_M, grains_per_tile, PARTIAL_GRAIN)), 2)
            grain = tile_n * grains_per_tile + tl.arange(0, grains_per_tile)
            grains = tl.cdiv(N, PARTIAL_GRAIN)
            tl.store(partials_ptr + row_id.to(tl.int64)[:, None] * grains + grain[None, :], partial,
                     mask=row_ok[:, None] & (grain[None, :] < grains))
    else:  # DOWN, GRAD_X
        if HAS_BIAS and EPILOGUE == DOWN:  # w * (h @ down^T + bias) = (w * h) @ down^T + w * bias
            acc += tl.load(routing_weights_ptr + row_id).to(tl.float32)[:, None] * bias
        tl.store(out_ptr + row_id.to(tl.int64)[:, None] * N + offs_n[None, :], to_dtype(acc, out_ty), mask=keep)


@triton.jit
def _weight_grad_tile(plan_ptr, R, routing_weights_ptr, tile, expert, p_ptr, q_ptr, stride_q_row, out_ptr,
                      bias_out_ptr, P, Q, TOPK, OF_DOWN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_P: tl.constexpr,
                      PRECISION: tl.constexpr):
    """One [BLOCK_P, BLOCK_Q] tile of out[e] = sum over expert e's rows r of P[r]^T Q[r]: d(gate | up) =
    d(act)^T x, or (OF_DOWN) d(down) = grad_out^T (w * h). Experts without rows get zeros. HAS_BIAS: the
    tiles of the first Q block also write the bias gradient, the column sums of P over those rows (OF_DOWN:
    of w * grad_out, the down bias meeting the output scaled by w), from a second pass over P's rows (L2-hot),
    outside the dot loop."""
    tile_p, tile_q = _grouped_tile(tile, tl.cdiv(P, BLOCK_P), tl.cdiv(Q, BLOCK_Q), GROUP_P)
    start = tl.load(plan_ptr + R + expert)
    end = tl.load(plan_ptr + R + expert + 1)
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tile_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for first in range(start, end, BLOCK_R):
        pos = first + tl.arange(0, BLOCK_R)
        r_ok = pos < end
        row_id = tl.load(plan_ptr + pos, mask=r_ok, other=0)
        token = (row_id // TOPK).to(tl.int64)
        if OF_DOWN:
            p_row, q_row = token, pos.to(tl.int64)
        else:
            p_row, q_row = pos.to(tl.int64), token
        p_t = tl.load(p_ptr + p_row[None, :] * P + offs_p[:, None], mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        q = tl.load(q_ptr + q_row[:, None] * stride_q_row + offs_q[None, :], mask=r_ok[:, None] & q_ok[None, :],
                    other=0.0)
        acc = _dot(p_t, q, acc, PRECISION)
    tl.store(out_ptr + (expert.to(tl.int64) * P + offs_p[:, None]) * Q + offs_q[None, :],
             to_dtype(acc, out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
    if HAS_BIAS:
        if tile_q == 0:
            sums = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for first in range(start, end, BLOCK_R):
                pos = first + tl.arange(0, BLOCK_R)
                r_ok = pos < end
                row_id = tl.load(plan_ptr + pos, mask=r_ok, other=0)
                if OF_DOWN:
                    p_row = (row_id // TOPK).to(tl.int64)
                    scale = tl.load(routing_weights_ptr + row_id, mask=r_ok, other=0.0).to(tl.float32)
                else:
                    p_row = pos.to(tl.int64)
                    scale = tl.where(r_ok, 1.0, 0.0)
                p_t = tl.load(p_ptr + p_row[None, :] * P + offs_p[:, None], mask=p_ok[:, None] & r_ok[None, :],
                              other=0.0).to(tl.float32)
                sums += tl.sum(p_t * scale[None, :], 1)
            tl.store(bias_out_ptr + expert.to(tl.int64) * P + offs_p, to_dtype(sums, bias_out_ptr.dtype.element_ty),
                     mask=p_ok)


@autotune(_WEIGHT_GRAD_CONFIGS, key=["P", "Q", "P2", "Q2", "HAS_BIAS"],
          prune_configs_by={"early_config_prune": _weight_grad_candidates})
@triton.jit
def _expert_weight_grads_kernel(
    plan_ptr, R, routing_weights_ptr,
    p_ptr, q_ptr, stride_q_row, out_ptr, bias_out_ptr, P, Q,  # d(gate | up) [E, P, Q] from d(act) [R, P], x [T, Q]
    p2_ptr, q2_ptr, stride_q2_row, out2_ptr, bias2_out_ptr, P2, Q2,  # d(down) [E, P2, Q2]: grad_out, w * h [R, Q2]
    TOPK, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_P: tl.constexpr, PRECISION: tl.constexpr,
):
    """Both weight gradients (and the biases') in one launch: per expert, first the tiles of d(gate | up), then
    those of d(down)."""
    expert = tl.program_id(1)
    tile = tl.program_id(0)
    first_tiles = tl.cdiv(P, BLOCK_P) * tl.cdiv(Q, BLOCK_Q)
    if tile < first_tiles:
        _weight_grad_tile(plan_ptr, R, routing_weights_ptr, tile, expert, p_ptr, q_ptr, stride_q_row, out_ptr,
                          bias_out_ptr, P, Q, TOPK, False, HAS_BIAS, BLOCK_P, BLOCK_Q, BLOCK_R, GROUP_P, PRECISION)
    else:
        _weight_grad_tile(plan_ptr, R, routing_weights_ptr, tile - first_tiles, expert, p2_ptr, q2_ptr,
                          stride_q2_row, out2_ptr, bias2_out_ptr, P2, Q2, TOPK, True, HAS_BIAS, BLOCK_P, BLOCK_Q,
                          BLOCK_R, GROUP_P, PRECISION)


def expert_rows_gemm(epilogue, plan, layout, a, b, b_strides, out, n, k, top_k, *, b2=None, b2_strides=None,
                     act=None, routing_weights=None, partials=None, extra_output=False, biases=(None, None),
                     gating=("silu", 1.0, 0.0)):
    """The row-grouped GEMM over the plan's tiles. B[e][k, n] lives at b + e*s0 + k*s1 + n*s2 for
    b_strides = (s0, s1, s2), so transposed weights need no view; b2 likewise (up). `biases`: GATE_UP's gate
    and up biases [E, n], DOWN's down bias [E, n] and None, any strides; `gating`: (activation, alpha, limit).
    Pointers the epilogue does not use get an empty tensor, never an output: where Inductor cannot tell which
    arguments a kernel writes, it takes each as written, and an output passed twice would come back as the copy
    the kernel did not write."""
    if layout.max_tiles == 0:
        return
    b2, b2_strides = (b, b_strides) if b2 is None else (b2, b2_strides)
    unused = out.new_empty(0)
    bias, bias2 = biases
    bias2 = bias if bias2 is None else bias2
    bias_args = ((unused, 0, 0) * 2 if bias is None
                 else (bias, bias.stride(0), bias.stride(1), bias2, bias2.stride(0), bias2.stride(1)))
    activation, alpha, limit = gating
    grid = lambda meta: (layout.max_tiles * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    key = ("rows", epilogue.value, extra_output, bias is not None, activation, layout.block_m, n, k, a.dtype,
           b.dtype, out.dtype, None if routing_weights is None else routing_weights.dtype, a.device)
    launch(_expert_rows_gemm_kernel, grid, key,
           plan, layout.rows, layout.experts, a, a.stride(0), b, *b_strides, b2, *b2_strides, out,
           unused if act is None else act, unused if routing_weights is None else routing_weights,
           unused if partials is None else partials, *bias_args, float(alpha), float(limit), n, k, top_k,
           EPILOGUE=epilogue.value, EXTRA_OUTPUT=extra_output, HAS_BIAS=bias is not None,
           CLAMPED=activation == "clamped_swiglu", BLOCK_M=layout.block_m, PRECISION=dot_precision())


def expert_weight_grads(plan, layout, grad_act, x, d_gate_up, grad_out, weighted_h, d_down, top_k, *,
                        routing_weights=None, d_gate_up_bias=None, d_down_bias=None):
    """In one launch, per expert over its rows: d_gate_up [E, 2I, H] = d(act)^T x (d(act) in plan order, x gathered
    by token) and d_down [E, H, I] = grad_out^T (w * h) (grad_out gathered, w * h in plan order); with biases,
    d_gate_up_bias [E, 2I] = the column sums of d(act) and d_down_bias [E, H] those of w * grad_out."""
    experts, p_size, q_size = d_gate_up.shape
    p2_size, q2_size = d_down.shape[1:]
    has_bias = d_gate_up_bias is not None
    unused = d_gate_up.new_empty(0)
    grid = lambda meta: (cdiv(p_size, meta["BLOCK_P"]) * cdiv(q_size, meta["BLOCK_Q"])  # noqa: E731
                         + cdiv(p2_size, meta["BLOCK_P"]) * cdiv(q2_size, meta["BLOCK_Q"]), experts)
    key = ("weight_grads", has_bias, p_size, q_size, p2_size, q2_size, grad_act.dtype, x.dtype, d_gate_up.dtype,
           grad_act.device)
    launch(_expert_weight_grads_kernel, grid, key, plan, layout.rows,
           routing_weights if has_bias else unused,
           grad_act, x, x.stride(0), d_gate_up, d_gate_up_bias if has_bias else unused, p_size, q_size,
           grad_out, weighted_h, weighted_h.stride(0), d_down, d_down_bias if has_bias else unused, p2_size, q2_size,
           top_k, HAS_BIAS=has_bias, PRECISION=dot_precision())
