"""`fuser::moe_experts`: the routed SwiGLU experts of a MoE block, sorted by expert on the GPU.

    out[t] = sum_k w[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),   e = ids[t, k]

`moe_experts` is a composite op: it calls `moe_experts_forward`, which also returns what the
backward needs (the routing plan, gate/up pre-activations and w * h in plan order) when a gradient
is required, and whose autograd formula is `moe_experts_backward`. Neither syncs the host: the plan's
sizes follow from shapes, so Inductor can launch the kernels itself (kernels/runtime/ops.py).

Numerics: dots accumulate in fp32. The routing weight scales h before the down GEMM (down is
linear: down(w h) = w down(h)); w * h is rounded to x.dtype once, as it feeds the GEMM, where
transformers rounds h and then w * y. Each (token, k) row is rounded to x.dtype, and the k rows
are summed in fp32 and rounded once. Differences stay at x.dtype's rounding level.

gate_proj / up_proj: [E, I, H] each, any strides (views of transformers' gate_up_proj are read
in place). With up_proj None, gate_proj is the whole [E, 2I, H] gate_up_proj (gate rows first):
its gradient then comes back as one tensor, which saves autograd the two slice-backward copies
of a [E, 2I, H] buffer that separate views cost.

Expert ids outside [0, E) contribute nothing (transformers' expert-parallel sentinel).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime import KernelLimits, cdiv, entry_op, fused_op, use_triton
from .gemm import (DOWN, GATE_UP, GRAD_H, GRAD_X, PARTIAL_GRAIN, block_m_for, expert_rows_gemm, expert_weight_grad,
                   sum_over_topk)
from .plan import PlanLayout, build_plan, build_plan_reference


@dataclass(frozen=True)
class MoELimits(KernelLimits):
    """x, the expert weights and the router logits in one of `dtypes` (x and the weights share one); routing
    and the experts' dots compute in float32; the experts fuse SwiGLU, silu(gate) · up, and no other activation."""
    activation: str = "silu"


LIMITS = MoELimits()


def gate_up_views(gate_proj, up_proj):
    """(gate [E, I, H], up [E, I, H]) views; up_proj None means gate_proj is [E, 2I, H]."""
    if up_proj is not None:
        return gate_proj, up_proj
    intermediate = gate_proj.shape[1] // 2
    return gate_proj.narrow(1, 0, intermediate), gate_proj.narrow(1, intermediate, intermediate)


def _check(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj):
    """(T, H, K, E, I) after checking the shapes and dtypes agree (shape arithmetic only: it runs every call)."""
    if x.dim() != 2 or topk_ids.dim() != 2 or gate_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError("moe_experts: need x [T, H], topk_ids [T, K], gate/up [E, I, H], down [E, H, I]")
    tokens, hidden = x.shape
    experts, gate_rows, gate_hidden = gate_proj.shape
    intermediate = gate_rows if up_proj is not None else gate_rows // 2
    up_shape = (experts, intermediate, hidden) if up_proj is None else tuple(up_proj.shape)
    if (up_proj is None and gate_rows % 2) or gate_hidden != hidden or up_shape != (experts, intermediate, hidden) \
            or tuple(down_proj.shape) != (experts, hidden, intermediate):
        raise ValueError(f"moe_experts: weight shapes gate {tuple(gate_proj.shape)}, up "
                         f"{None if up_proj is None else tuple(up_proj.shape)}, down {tuple(down_proj.shape)} "
                         f"do not fit x {tuple(x.shape)}")
    if topk_ids.shape[0] != tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe_experts: topk_ids {tuple(topk_ids.shape)} / topk_weights "
                         f"{tuple(topk_weights.shape)} must be [T, K] with T = {tokens}")
    if topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError("moe_experts: topk_ids must be integers")
    if not (x.dtype == gate_proj.dtype == down_proj.dtype and (up_proj is None or up_proj.dtype == x.dtype)):
        raise ValueError(f"moe_experts: x and the weights need one dtype, got x {x.dtype}, gate {gate_proj.dtype}, "
                         f"up {None if up_proj is None else up_proj.dtype}, down {down_proj.dtype}")
    return tokens, hidden, topk_ids.shape[1], experts, intermediate


def _runs_triton(x, *tensors):
    return use_triton(x, *tensors) and x.dtype in LIMITS.dtypes


def _plan_layout(tokens, top_k, experts):
    rows = tokens * top_k
    return PlanLayout(rows, experts, block_m_for(rows, experts))


def experts_reference(x, topk_ids, topk_weights, gate, up, down, plan_parts):
    """Plain torch (fp32 math), differentiable: (out, gate|up pre-activations, w * h), the last two in plan order."""
    sorted_rows, expert_offsets = plan_parts[0], plan_parts[1]
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    bounds = expert_offsets.tolist()
    rows = sorted_rows[:bounds[-1]].long()
    x_rows = x[rows // top_k].float()
    weights = topk_weights.reshape(-1)[rows].float()[:, None]
    act, weighted_h, y = [], [], []
    for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        gate_out = x_rows[start:end] @ gate[expert].float().T
        up_out = x_rows[start:end] @ up[expert].float().T
        act.append(torch.cat([gate_out, up_out], 1))
        weighted_h.append((weights[start:end] * F.silu(gate_out) * up_out).to(x.dtype))
        y.append(weighted_h[-1].float() @ down[expert].float().T)
    act, weighted_h, y = torch.cat(act), torch.cat(weighted_h), torch.cat(y)
    out = x.new_zeros(tokens * top_k, hidden, dtype=torch.float32).index_add(0, rows, y.to(x.dtype).float())
    unrouted = tokens * top_k - rows.numel()
    return (out.view(tokens, top_k, hidden).sum(1).to(x.dtype),
            F.pad(act.to(x.dtype), (0, 0, 0, unrouted)), F.pad(weighted_h, (0, 0, 0, unrouted)))


def experts_backward_reference(grad_out, x, topk_ids, topk_weights, gate, up, down, plan_parts):
    """Plain torch (fp32 math): (dx, d(topk_weights), d(gate|up) [E, 2I, H], d(down)), the forward's chain rule
    written out per expert (a custom op's body runs below autograd, so it cannot call autograd)."""
    sorted_rows, expert_offsets = plan_parts[0], plan_parts[1]
    top_k = topk_ids.shape[1]
    bounds = expert_offsets.tolist()
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    d_weights = torch.zeros(topk_weights.numel(), dtype=torch.float32, device=x.device)
    d_gate_up = torch.cat([torch.zeros_like(gate, dtype=torch.float32), torch.zeros_like(up, dtype=torch.float32)], 1)
    d_down = torch.zeros_like(down, dtype=torch.float32)
    intermediate = gate.shape[1]
    for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = sorted_rows[start:end].long()
        tokens = rows // top_k
        x_rows, grad_y = x[tokens].float(), grad_out[tokens].float()
        weight = topk_weights.reshape(-1)[rows].float()[:, None]
        gate_out, up_out = x_rows @ gate[expert].float().T, x_rows @ up[expert].float().T
        sig = gate_out.sigmoid()
        h = (gate_out * sig * up_out).to(x.dtype).float()
        d_weights[rows] = (grad_y * (h @ down[expert].float().T)).sum(1)
        d_down[expert] = (weight * grad_y).T @ h
        grad_h = weight * (grad_y @ down[expert].float())
        grad_gate = grad_h * up_out * sig * (1 + gate_out * (1 - sig))
        grad_up = grad_h * gate_out * sig
        d_gate_up[expert, :intermediate] = grad_gate.T @ x_rows
        d_gate_up[expert, intermediate:] = grad_up.T @ x_rows
        dx.index_add_(0, tokens, grad_gate @ gate[expert].float() + grad_up @ up[expert].float())
    return (dx.to(x.dtype), d_weights.view(topk_weights.shape).to(topk_weights.dtype), d_gate_up.to(gate.dtype),
            d_down.to(down.dtype))


# The ops (kernels/runtime/ops.py): fuser::moe_experts over fuser::moe_experts_forward, fuser::moe_experts_backward

def _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj):
    """((T, H, K, E, I), the plan's layout) of a call, after checking its arguments."""
    dims = _check(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj)
    tokens, _, top_k, experts, _ = dims
    return dims, _plan_layout(tokens, top_k, experts)


def _forward_kernel(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_proj: torch.Tensor,
                    up_proj: torch.Tensor | None, down_proj: torch.Tensor, save_for_backward: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, H], plan int32, gate|up pre-activations [R, 2I], w * h [R, I]); the last two are empty
    unless save_for_backward. R = T * K rows, in the plan's order."""
    (tokens, hidden, top_k, experts, intermediate), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj,
                                                                     down_proj)
    saved_rows = layout.rows if save_for_backward else 0
    gate, up = gate_up_views(gate_proj, up_proj)
    plan = build_plan(topk_ids.contiguous(), experts, layout.block_m)
    x = x if x.stride(1) == 1 else x.contiguous()
    weighted_h = x.new_empty(layout.rows, intermediate)
    act = x.new_empty(saved_rows, 2 * intermediate)
    # B[e][k, n] = gate[e][n, k]: the transposed strides
    expert_rows_gemm(GATE_UP, plan, layout, x, gate, _transposed(gate), weighted_h, intermediate, hidden, top_k,
                     b2=up, b2_strides=_transposed(up), act=act, routing_weights=topk_weights.contiguous().view(-1),
                     extra_output=save_for_backward)
    contributions = x.new_empty(layout.rows, hidden)
    expert_rows_gemm(DOWN, plan, layout, weighted_h, down_proj, _transposed(down_proj), contributions, hidden,
                     intermediate, top_k)
    out = x.new_empty(tokens, hidden)
    sum_over_topk(contributions, topk_ids.contiguous(), out, experts)
    return out, plan, act, weighted_h.narrow(0, 0, saved_rows)


def _forward_reference(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, save_for_backward):
    (_, _, _, experts, _), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj)
    saved_rows = layout.rows if save_for_backward else 0
    plan = build_plan_reference(topk_ids, experts, layout.block_m)
    out, act, h = experts_reference(x, topk_ids, topk_weights, *gate_up_views(gate_proj, up_proj), down_proj,
                                    layout.split(plan))
    return out, plan, act[:saved_rows], h[:saved_rows]


def _forward_fake(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, save_for_backward):
    (tokens, hidden, _, _, intermediate), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj)
    saved_rows = layout.rows if save_for_backward else 0
    return (x.new_empty(tokens, hidden), x.new_empty(layout.size, dtype=torch.int32),
            x.new_empty(saved_rows, 2 * intermediate), x.new_empty(saved_rows, intermediate))


def _transposed(weight):
    """Strides of weight[e].T: B[e][k, n] = weight[e][n, k]."""
    return weight.stride(0), weight.stride(2), weight.stride(1)


def _empty(like):
    return like.new_empty(0)


def _backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     gate_proj: torch.Tensor, up_proj: torch.Tensor | None, down_proj: torch.Tensor,
                     plan: torch.Tensor, gate_up_act: torch.Tensor, weighted_h: torch.Tensor,
                     needs_x: bool, needs_weights: bool, needs_params: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, H], d(topk_weights) [T, K], d(gate|up) [E, 2I, H], d(down) [E, H, I]); each empty unless needed."""
    (tokens, hidden, top_k, experts, intermediate), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj,
                                                                     down_proj)
    gate, up = gate_up_views(gate_proj, up_proj)
    grad_out = grad_out.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    routing_weights = topk_weights.contiguous().view(-1)
    # d(loss)/d(gate | up pre-activations), rows in plan order
    grad_act = x.new_empty(layout.rows, 2 * intermediate)
    partials = None
    if needs_weights:  # zeros: rows of unrouted ids (no tile covers them) must get d(weight) = 0
        partials = torch.zeros(layout.rows, cdiv(intermediate, PARTIAL_GRAIN.value), dtype=torch.float32,
                               device=x.device)
    expert_rows_gemm(GRAD_H, plan, layout, grad_out, down_proj, down_proj.stride(), grad_act, intermediate, hidden,
                     top_k, act=gate_up_act, routing_weights=routing_weights, partials=partials,
                     extra_output=needs_weights)
    d_weights = partials.sum(1).view(tokens, top_k).to(topk_weights.dtype) if needs_weights else _empty(x)
    dx = _empty(x)
    if needs_x:
        dx_rows = x.new_empty(layout.rows, hidden)
        expert_rows_gemm(GRAD_X, plan, layout, grad_act, gate, gate.stride(), dx_rows, hidden, intermediate, top_k,
                         b2=up, b2_strides=up.stride())
        dx = x.new_empty(tokens, hidden)
        sum_over_topk(dx_rows, topk_ids.contiguous(), dx, experts)
    d_gate_up, d_down = _empty(x), _empty(x)
    if needs_params:
        d_gate_up = gate.new_empty(experts, 2 * intermediate, hidden)
        expert_weight_grad(plan, layout, grad_act, x, d_gate_up, top_k, of_down=False)
        d_down = down_proj.new_empty(experts, hidden, intermediate)
        expert_weight_grad(plan, layout, grad_out, weighted_h, d_down, top_k, of_down=True)
    return dx, d_weights, d_gate_up, d_down


def _backward_reference(grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, plan, gate_up_act,
                        weighted_h, needs_x, needs_weights, needs_params):
    _, layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj)
    dx, d_weights, d_gate_up, d_down = experts_backward_reference(
        grad_out, x, topk_ids, topk_weights, *gate_up_views(gate_proj, up_proj), down_proj, layout.split(plan))
    return (dx if needs_x else _empty(x), d_weights if needs_weights else _empty(x),
            d_gate_up if needs_params else _empty(x), d_down if needs_params else _empty(x))


def _backward_fake(grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, plan, gate_up_act,
                   weighted_h, needs_x, needs_weights, needs_params):
    tokens, hidden, top_k, experts, intermediate = _check(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj)
    return (x.new_empty(tokens, hidden) if needs_x else _empty(x),
            topk_weights.new_empty(tokens, top_k) if needs_weights else _empty(x),
            gate_proj.new_empty(experts, 2 * intermediate, hidden) if needs_params else _empty(x),
            down_proj.new_empty(experts, hidden, intermediate) if needs_params else _empty(x))


_call_backward = fused_op("moe_experts_backward", _backward_kernel, _backward_reference, _backward_fake,
                          lambda grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, *_:
                          _runs_triton(x, grad_out, topk_ids, topk_weights, gate_proj, up_proj, down_proj))


def _setup_context(ctx, inputs, output):
    x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, save_for_backward = inputs
    _, plan, act, weighted_h = output
    ctx.mark_non_differentiable(plan, act, weighted_h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, plan, act, weighted_h)
    ctx.saved_activations = save_for_backward


def _backward(ctx, grad_out, *_):
    needs = ctx.needs_input_grad  # x, ids, weights, gate, up, down, save
    if grad_out is None:
        return (None,) * 7
    if not ctx.saved_activations:
        raise RuntimeError("fuser::moe_experts_forward ran with save_for_backward=False: call fuser::moe_experts, "
                           "which saves the activations whenever a gradient is needed")
    x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, plan, act, weighted_h = ctx.saved_tensors
    dx, d_weights, d_gate_up, d_down = _call_backward(
        grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, plan, act, weighted_h,
        needs[0], needs[2], any(needs[3:6]))
    if up_proj is None:
        d_gate, d_up = d_gate_up, None
    else:
        d_gate, d_up = d_gate_up.split(gate_proj.shape[1], 1) if any(needs[3:5]) else (None, None)
    return (dx if needs[0] else None, None, d_weights if needs[2] else None, d_gate if needs[3] else None,
            d_up if needs[4] else None, d_down if needs[5] else None, None)


_call_forward = fused_op("moe_experts_forward", _forward_kernel, _forward_reference, _forward_fake,
                         lambda x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, _:
                         _runs_triton(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj),
                         setup_context=_setup_context, backward=_backward)


@entry_op
def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_proj: torch.Tensor,
                up_proj: torch.Tensor | None, down_proj: torch.Tensor) -> torch.Tensor:
    """out [T, H]; saves the backward's activations only when a gradient will be asked for."""
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, topk_weights, gate_proj, up_proj, down_proj))
    return _call_forward(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, save)[0]
