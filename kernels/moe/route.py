"""`fuser::moe_route`: router logits -> (top-k weights, expert ids), in one kernel.

Covers the routers of transformers 5.x: softmax over experts in fp32 then top-k (OLMoE, Mixtral,
Qwen2/3-MoE), and sigmoid scores with a correction bias used only to choose the experts
(DeepSeek-V3, `n_group == 1`); optional renormalization over the chosen k and a scaling factor.

Order: the k experts come largest score first, NaN above everything (as in `torch.topk`), and
equal scores lowest expert index first. torch.topk chooses among equal scores by a rule of its
own (on CPU it depends on E, k and the other scores), and this kernel's fp32 softmax may differ
from torch's in the last bit, which makes or breaks a tie: where a tie straddles the k-th place
the two send the token to different experts, and the block's output changes (tied experts get
equal weights, not equal weight matrices). The chosen set is torch's whatever the ties only when
top_k = E (`routing_tie_problem` below).
"""
import torch
import triton
import triton.language as tl

from ..language import exp, to_dtype
from ..runtime import Rows, cdiv, entry_op, fused_op, interpreting, launch, next_pow2, use_triton

SCORINGS = ("softmax", "sigmoid")
_ROWS_PER_PROGRAM_ELEMENTS = 1024  # BLOCK_T * E_POW2 per program: small, the top-k loop is latency-bound


@triton.jit
def _router_scores(logits_ptr, stride_t, rows, cols, T, E, SIGMOID: tl.constexpr):
    """fp32 scores [BLOCK_T, E_POW2]; padding columns hold 0."""
    inside = (rows[:, None] < T) & (cols[None, :] < E)
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=inside,
                     other=0.0).to(tl.float32)
    logits = tl.where(cols[None, :] < E, logits, float("-inf"))  # padding rows stay finite
    if SIGMOID:
        scores = 1.0 / (1.0 + exp(-logits))
    else:
        shifted = exp(logits - tl.max(logits, 1)[:, None])
        scores = shifted / tl.sum(shifted, 1)[:, None]
    return tl.where(cols[None, :] < E, scores, 0.0)


@triton.jit
def _route_forward_kernel(
    logits_ptr, stride_t, bias_ptr, weights_ptr, ids_ptr, T, E, scaling,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_POW2)
    scores = _router_scores(logits_ptr, stride_t, rows, cols, T, E, SIGMOID)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(choice != choice, float("inf"), choice)  # NaN first, as torch.topk
    taken = tl.broadcast_to(cols[None, :] >= E, [BLOCK_T, E_POW2])
    ks = tl.arange(0, K_POW2)
    ids = tl.zeros([BLOCK_T, K_POW2], dtype=tl.int32)
    weights = tl.zeros([BLOCK_T, K_POW2], dtype=tl.float32)
    for k in range(TOP_K):
        best = tl.max(tl.where(taken, float("-inf"), choice), 1)
        pick = tl.min(tl.where(~taken & (choice == best[:, None]), cols[None, :], E_POW2), 1)
        picked = cols[None, :] == pick[:, None]
        taken |= picked
        ids = tl.where(ks[None, :] == k, pick[:, None], ids)
        weights = tl.where(ks[None, :] == k, tl.sum(tl.where(picked, scores, 0.0), 1)[:, None], weights)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]
    weights = weights * scaling
    out = rows[:, None] * TOP_K + ks[None, :]
    inside = (rows[:, None] < T) & (ks[None, :] < TOP_K)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=inside)
    tl.store(weights_ptr + out, to_dtype(weights, weights_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _route_backward_kernel(
    logits_ptr, stride_t, ids_ptr, grad_weights_ptr, grad_logits_ptr, T, E, scaling,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, E_POW2: tl.constexpr,
):
    """d(logits) from d(weights): scatter into the chosen columns, through renormalization and scoring."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_POW2)
    in_rows = rows < T
    scores = _router_scores(logits_ptr, stride_t, rows, cols, T, E, SIGMOID)
    grad = tl.zeros([BLOCK_T, E_POW2], dtype=tl.float32)  # d(loss)/d(chosen weight before scaling), per column
    chosen = tl.zeros([BLOCK_T, E_POW2], dtype=tl.int1)
    for k in range(TOP_K):
        expert = tl.load(ids_ptr + rows * TOP_K + k, mask=in_rows, other=-1)
        g = tl.load(grad_weights_ptr + rows * TOP_K + k, mask=in_rows, other=0.0).to(tl.float32)
        hit = cols[None, :] == expert[:, None]
        chosen |= hit
        grad += tl.where(hit, g[:, None], 0.0)
    grad *= scaling
    if RENORMALIZE:  # w_j = s_j / S over the chosen j
        total = tl.where(in_rows, tl.sum(tl.where(chosen, scores, 0.0), 1), 1.0)
        mean_grad = tl.sum(grad * scores, 1) / total  # grad is zero off the chosen columns
        grad = tl.where(chosen, (grad - mean_grad[:, None]) / total[:, None], 0.0)
    if SIGMOID:
        grad_logits = grad * scores * (1.0 - scores)
    else:
        grad_logits = scores * (grad - tl.sum(grad * scores, 1)[:, None])
    inside = in_rows[:, None] & (cols[None, :] < E)
    tl.store(grad_logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
             to_dtype(grad_logits, grad_logits_ptr.dtype.element_ty), mask=inside)


def _launch_shape(T: int, E: int):
    e_pow2 = next_pow2(E)
    block_t = 16 if interpreting() else max(1, min(16, _ROWS_PER_PROGRAM_ELEMENTS // e_pow2))
    return e_pow2, block_t, (cdiv(T, block_t),)


def route_reference(router_logits, top_k, scoring, renormalize, bias, scaling):
    """Plain torch, differentiable: (fp32 weights, int64 ids)."""
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    choice = scores if bias is None else scores + bias.float()
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scaling, ids


def route_backward_reference(grad_weights, router_logits, ids, scoring, renormalize, scaling):
    """d(logits) of `route_reference` in closed form, as the kernel computes it (an op's body runs
    below autograd, so it cannot differentiate the forward there)."""
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    grad = torch.zeros_like(scores).scatter_add_(1, ids, grad_weights.float() * scaling)
    if renormalize:  # w_j = s_j / S over the chosen j
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)
        total = torch.where(chosen, scores, 0.0).sum(1, keepdim=True)
        grad = torch.where(chosen, (grad - (grad * scores).sum(1, keepdim=True) / total) / total, 0.0)
    if scoring == "sigmoid":
        grad_logits = grad * scores * (1.0 - scores)
    else:
        grad_logits = scores * (grad - (grad * scores).sum(1, keepdim=True))
    return grad_logits.to(router_logits.dtype)


def _check(router_logits, top_k, scoring):
    if scoring not in SCORINGS:
        raise ValueError(f"moe_route: scoring must be one of {SCORINGS}, got {scoring!r}")
    if router_logits.dim() != 2 or not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"moe_route: need logits [T, E] and 1 <= top_k <= E, got {tuple(router_logits.shape)}, "
                         f"top_k={top_k}")


# The ops (kernels/runtime/ops.py): fuser::moe_route over fuser::moe_route_forward, fuser::moe_route_backward

def _route_kernel(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, bias: torch.Tensor | None,
                  scaling: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] in out_dtype, ids [T, top_k] int64) of the k best experts of each token."""
    _check(router_logits, top_k, scoring)
    T, E = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=out_dtype, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        e_pow2, block_t, grid = _launch_shape(T, E)
        launch(
            _route_forward_kernel, grid, ("moe.route", T, E),
            logits, logits.stride(0), bias if bias is not None else logits, weights, ids, T, E, scaling,
            top_k, next_pow2(top_k), scoring == "sigmoid", bias is not None, renormalize,
            block_t, e_pow2,
        )
    return weights, ids


def _route_reference(router_logits, top_k, scoring, renormalize, bias, scaling, out_dtype):
    _check(router_logits, top_k, scoring)
    weights, ids = route_reference(router_logits, top_k, scoring, renormalize, bias, scaling)
    return weights.to(out_dtype), ids


def _route_fake(router_logits, top_k, scoring, renormalize, bias, scaling, out_dtype):
    _check(router_logits, top_k, scoring)
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=out_dtype),
            router_logits.new_empty(T, top_k, dtype=torch.int64))


def _backward_kernel(grad_weights: torch.Tensor, router_logits: torch.Tensor, ids: torch.Tensor, scoring: str,
                     renormalize: bool, scaling: float) -> torch.Tensor:
    T, E = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    grad_logits = torch.empty(T, E, dtype=router_logits.dtype, device=logits.device)
    if T:
        e_pow2, block_t, grid = _launch_shape(T, E)
        launch(
            _route_backward_kernel, grid, ("moe.route_backward", T, E),
            logits, logits.stride(0), ids.contiguous(), grad_weights.contiguous(), grad_logits, T, E, scaling,
            ids.shape[1], scoring == "sigmoid", renormalize, block_t, e_pow2,
        )
    return grad_logits


def _backward_fake(grad_weights, router_logits, ids, scoring, renormalize, scaling):
    return torch.empty_like(router_logits, memory_format=torch.contiguous_format)


_call_backward = fused_op("moe_route_backward", _backward_kernel, route_backward_reference, _backward_fake,
                          lambda grad_weights, router_logits, *_: use_triton(router_logits, grad_weights),
                          rows=Rows(args=(0, 1, 2)))


def _setup_context(ctx, inputs, output):
    router_logits, _, scoring, renormalize, _, scaling, _ = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.routing = (scoring, renormalize, scaling)


def _backward(ctx, grad_weights, _grad_ids):
    router_logits, ids = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _call_backward(grad_weights, router_logits, ids, *ctx.routing)
    return grad_logits, None, None, None, None, None, None


_call_forward = fused_op("moe_route_forward", _route_kernel, _route_reference, _route_fake,
                         lambda router_logits, top_k, scoring, renormalize, bias, *_: use_triton(router_logits, bias),
                         setup_context=_setup_context, backward=_backward, rows=Rows(args=(0,)))  # tokens


@entry_op
def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, bias: torch.Tensor | None,
              scaling: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] in out_dtype, ids [T, top_k] int64) of the k best experts of each token."""
    return _call_forward(router_logits, top_k, scoring, renormalize, bias, scaling, out_dtype)


def routing_tie_problem(top_k: int, experts: int) -> str | None:
    """Why `fuser::moe_route` would not choose the experts `torch.topk` chooses, or None.

    The kernel chooses the lowest experts among equal scores. torch.topk on CPU does so only on its
    partial-sort path (k·64 ≤ E); elsewhere std::nth_element chooses by where the other scores
    lie (top-2 of zeros with a 5 at index 4 is [4, 3]; with the last score -1, [4, 1]). CUDA's
    single-block top-k keeps the first equal scores too, but the kernel's fp32 softmax may differ
    from torch's in the last bit (exp, summation order), which makes or breaks a tie. So no device
    or size rule makes the choice torch's where a tie straddles the k-th place: the token would go
    to another expert. Only when every expert is chosen (top-k = number of experts) is the choice
    the same whatever the ties (the experts sum over the k choices in any order)."""
    if top_k == experts:
        return None
    return (f"not exact: on a tie in the router's scores at the k-th place fuser::moe_route chooses the lowest "
            f"expert index and torch.topk its own order, so a token would go to another expert (exact only for "
            f"top-k = number of experts, here {top_k} of {experts})")
