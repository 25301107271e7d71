"""`fuser::moe_experts`: the routed gated experts of a MoE block, sorted by expert on the GPU.

    out[t] = sum_k w[t, k] * (down[e] @ glu(gate[e] @ x[t] + gate_bias[e], up[e] @ x[t] + up_bias[e]) + down_bias[e])

with e = ids[t, k], biases optional (None), and glu one of ACTIVATIONS:
    "silu"            silu(g) * u                                            (SwiGLU: Mixtral, OLMoE, Qwen, ...)
    "clamped_swiglu"  g' * sigmoid(alpha * g') * (u' + 1), g' = g.clamp(max=limit), u' = u.clamp(-limit, limit)
                      (GPT-OSS's experts, `GptOssExperts._apply_gate`)

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

from ..runtime import KernelLimits, cdiv, entry_op, fused_op, halves, use_triton
from .gemm import DOWN, GATE_UP, GRAD_H, GRAD_X, PARTIAL_GRAIN, block_m_for, expert_rows_gemm, expert_weight_grads
from .over_topk import over_topk
from .plan import PlanLayout, build_plan, build_plan_reference


ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class MoELimits(KernelLimits):
    """x, the expert weights and biases and the router logits in one of `dtypes` (x, the weights and the biases
    share one); routing and the experts' dots compute in float32; the experts fuse the gated activations
    `activations` (module docstring) and no other."""
    activations: tuple[str, ...] = ACTIVATIONS


LIMITS = MoELimits()


def glu(gate, up, activation: str, alpha: float, limit: float):
    """The gated activation in plain torch (of fp32 pre-activations in the references)."""
    if activation == "clamped_swiglu":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    return F.silu(gate) * up


def glu_grad(grad_h, gate, up, activation: str, alpha: float, limit: float):
    """(d gate, d up) of `glu` in closed form, as the kernel computes them (a clamp passes the gradient where its
    input is within its bounds, ends included, as torch.clamp's backward)."""
    if activation == "clamped_swiglu":
        gate_c, up_c = gate.clamp(max=limit), up.clamp(-limit, limit)
        sig = torch.sigmoid(alpha * gate_c)
        d_gate = torch.where(gate <= limit, grad_h * (up_c + 1) * sig * (1 + alpha * gate_c * (1 - sig)), 0.0)
        return d_gate, torch.where((up >= -limit) & (up <= limit), grad_h * gate_c * sig, 0.0)
    sig = gate.sigmoid()
    return grad_h * up * sig * (1 + gate * (1 - sig)), grad_h * gate * sig


def gate_up_views(gate_proj, up_proj):
    """(gate [E, I, H], up [E, I, H]) views; up_proj None means gate_proj is [E, 2I, H]."""
    if up_proj is not None:
        return gate_proj, up_proj
    intermediate = gate_proj.shape[1] // 2
    return gate_proj.narrow(1, 0, intermediate), gate_proj.narrow(1, intermediate, intermediate)


def _check(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias=None, up_bias=None, down_bias=None,
           activation="silu"):
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
    _check_biases(x, gate_bias, up_bias, down_bias, up_proj is None, experts, intermediate, hidden)
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return tokens, hidden, topk_ids.shape[1], experts, intermediate


def _check_biases(x, gate_bias, up_bias, down_bias, stacked, experts, intermediate, hidden):
    """Biases as the weights: none, or gate [E, 2I] (stacked, up None) or gate and up [E, I], and down [E, H]."""
    if gate_bias is None and up_bias is None and down_bias is None:
        return
    gate_shape = (experts, 2 * intermediate if stacked else intermediate)
    shapes = [None if b is None else tuple(b.shape) for b in (gate_bias, up_bias, down_bias)]
    if shapes != [gate_shape, None if stacked else (experts, intermediate), (experts, hidden)]:
        raise ValueError(f"moe_experts: biases gate {shapes[0]}, up {shapes[1]}, down {shapes[2]} do not fit the "
                         f"weights (gate {gate_shape}, {'no up' if stacked else 'up the same'}, down "
                         f"{(experts, hidden)})")
    if any(b is not None and b.dtype != x.dtype for b in (gate_bias, up_bias, down_bias)):
        raise ValueError(f"moe_experts: the biases need x's dtype {x.dtype}")


def _runs_triton(x, *tensors):
    return use_triton(x, *tensors) and x.dtype in LIMITS.dtypes


def _plan_layout(tokens, top_k, experts):
    rows = tokens * top_k
    return PlanLayout(rows, experts, block_m_for(rows, experts))


def expert_arguments(gate_up, down, gate_up_bias, down_bias, interleaved: bool, gating: tuple) -> tuple:
    """`moe_experts`' arguments after the routing for gate_up [E, 2I, H] and down [E, H, I] (views of any strides)
    and their biases [E, 2I] / [E, H] (or None): gate rows first, or `interleaved` (gate and up rows alternate,
    GPT-OSS), as views; `gating` is (activation, alpha, limit)."""
    if not interleaved:
        return (gate_up, None, down, gate_up_bias, None, down_bias, *gating)
    biases = (None,) * 3 if gate_up_bias is None else (gate_up_bias[:, 0::2], gate_up_bias[:, 1::2], down_bias)
    return (gate_up[:, 0::2], gate_up[:, 1::2], down, *biases, *gating)


def bias_views(gate_bias, up_bias):
    """(gate bias [E, I], up bias [E, I]) views, as `gate_up_views`; (None, None) without biases."""
    if gate_bias is None or up_bias is not None:
        return gate_bias, up_bias
    intermediate = gate_bias.shape[1] // 2
    return gate_bias.narrow(1, 0, intermediate), gate_bias.narrow(1, intermediate, intermediate)


def _row(bias, expert):
    return 0.0 if bias is None else bias[expert].float()


def experts_reference(x, topk_ids, topk_weights, gate, up, down, biases, gating, plan_parts):
    """Plain torch (fp32 math), differentiable: (out, gate|up pre-activations, w * h), the last two in plan order.
    `biases`: (gate [E, I], up [E, I], down [E, H]) or Nones; `gating`: (activation, alpha, limit)."""
    sorted_rows, expert_offsets = plan_parts[0], plan_parts[1]
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    bounds = expert_offsets.tolist()
    rows = sorted_rows[:bounds[-1]].long()
    x_rows = x[rows // top_k].float()
    weights = topk_weights.reshape(-1)[rows].float()[:, None]
    act, weighted_h, y = [], [], []
    for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        gate_out = x_rows[start:end] @ gate[expert].float().T + _row(biases[0], expert)
        up_out = x_rows[start:end] @ up[expert].float().T + _row(biases[1], expert)
        act.append(torch.cat([gate_out, up_out], 1))
        weighted_h.append((weights[start:end] * glu(gate_out, up_out, *gating)).to(x.dtype))
        y.append(weighted_h[-1].float() @ down[expert].float().T + weights[start:end] * _row(biases[2], expert))
    act, weighted_h, y = torch.cat(act), torch.cat(weighted_h), torch.cat(y)
    out = x.new_zeros(tokens * top_k, hidden, dtype=torch.float32).index_add(0, rows, y.to(x.dtype).float())
    unrouted = tokens * top_k - rows.numel()
    return (out.view(tokens, top_k, hidden).sum(1).to(x.dtype),
            F.pad(act.to(x.dtype), (0, 0, 0, unrouted)), F.pad(weighted_h, (0, 0, 0, unrouted)))


def experts_backward_reference(grad_out, x, topk_ids, topk_weights, gate, up, down, biases, gating, plan_parts):
    """Plain torch (fp32 math): (dx, d(topk_weights), d(gate|up) [E, 2I, H], d(down), d(gate|up bias) [E, 2I],
    d(down bias) [E, H]), the forward's chain rule written out per expert (a custom op's body runs below autograd,
    so it cannot call autograd); the bias gradients are empty without biases."""
    sorted_rows, expert_offsets = plan_parts[0], plan_parts[1]
    top_k = topk_ids.shape[1]
    bounds = expert_offsets.tolist()
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(x.shape, **f32)
    d_weights = torch.zeros(topk_weights.numel(), **f32)
    d_gate_up = torch.cat([torch.zeros_like(gate, **f32), torch.zeros_like(up, **f32)], 1)
    d_down = torch.zeros_like(down, **f32)
    d_gate_up_bias, d_down_bias = torch.zeros(d_gate_up.shape[:2], **f32), torch.zeros(down.shape[:2], **f32)
    intermediate = gate.shape[1]
    for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = sorted_rows[start:end].long()
        tokens = rows // top_k
        x_rows, grad_y = x[tokens].float(), grad_out[tokens].float()
        weight = topk_weights.reshape(-1)[rows].float()[:, None]
        gate_out = x_rows @ gate[expert].float().T + _row(biases[0], expert)
        up_out = x_rows @ up[expert].float().T + _row(biases[1], expert)
        h = glu(gate_out, up_out, *gating).to(x.dtype).float()
        d_weights[rows] = (grad_y * (h @ down[expert].float().T + _row(biases[2], expert))).sum(1)
        d_down[expert] = (weight * grad_y).T @ h
        d_down_bias[expert] = (weight * grad_y).sum(0)
        grad_gate, grad_up = glu_grad(weight * (grad_y @ down[expert].float()), gate_out, up_out, *gating)
        d_gate_up[expert, :intermediate] = grad_gate.T @ x_rows
        d_gate_up[expert, intermediate:] = grad_up.T @ x_rows
        d_gate_up_bias[expert] = torch.cat([grad_gate.sum(0), grad_up.sum(0)])
        dx.index_add_(0, tokens, grad_gate @ gate[expert].float() + grad_up @ up[expert].float())
    has_bias = biases[0] is not None
    return (dx.to(x.dtype), d_weights.view(topk_weights.shape).to(topk_weights.dtype), d_gate_up.to(gate.dtype),
            d_down.to(down.dtype), d_gate_up_bias.to(x.dtype) if has_bias else _empty(x),
            d_down_bias.to(x.dtype) if has_bias else _empty(x))


# The ops (kernels/runtime/ops.py): fuser::moe_experts over fuser::moe_experts_forward, fuser::moe_experts_backward.
# Their arguments: x, topk_ids, topk_weights, then the experts' six tensors (gate_proj, up_proj, down_proj,
# gate_bias, up_bias, down_bias) and their gating (activation, alpha, limit).

def _layout(x, topk_ids, topk_weights, *experts):
    """((T, H, K, E, I), the plan's layout) of a call, after checking its arguments."""
    dims = _check(x, topk_ids, topk_weights, *experts[:7])
    tokens, _, top_k, experts_count, _ = dims
    return dims, _plan_layout(tokens, top_k, experts_count)


def _forward_kernel(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_proj: torch.Tensor,
                    up_proj: torch.Tensor | None, down_proj: torch.Tensor, gate_bias: torch.Tensor | None,
                    up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, activation: str, alpha: float,
                    limit: float, save_for_backward: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, H], plan int32, gate|up pre-activations [R, 2I], w * h [R, I]); the last two are empty
    unless save_for_backward. R = T * K rows, in the plan's order."""
    (tokens, hidden, top_k, experts, intermediate), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj,
                                                                     down_proj, gate_bias, up_bias, down_bias,
                                                                     activation)
    saved_rows = layout.rows if save_for_backward else 0
    gate, up = gate_up_views(gate_proj, up_proj)
    gating = (activation, alpha, limit)
    plan = build_plan(topk_ids.contiguous(), experts, layout.block_m)
    x = x if x.stride(1) == 1 else x.contiguous()
    routing_weights = topk_weights.contiguous().view(-1)
    weighted_h = x.new_empty(layout.rows, intermediate)
    act = x.new_empty(saved_rows, 2 * intermediate)
    # B[e][k, n] = gate[e][n, k]: the transposed strides
    expert_rows_gemm(GATE_UP, plan, layout, x, gate, _transposed(gate), weighted_h, intermediate, hidden, top_k,
                     b2=up, b2_strides=_transposed(up), act=act, routing_weights=routing_weights,
                     extra_output=save_for_backward, biases=bias_views(gate_bias, up_bias), gating=gating)
    contributions = x.new_empty(layout.rows, hidden)
    expert_rows_gemm(DOWN, plan, layout, weighted_h, down_proj, _transposed(down_proj), contributions, hidden,
                     intermediate, top_k, routing_weights=routing_weights, biases=(down_bias, None))
    out = x.new_empty(tokens, hidden)
    over_topk(topk_ids.contiguous(), experts, contributions, out)
    return out, plan, act, weighted_h.narrow(0, 0, saved_rows)


def _forward_reference(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias,
                       activation, alpha, limit, save_for_backward):
    (_, _, _, experts, _), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias,
                                            up_bias, down_bias, activation)
    saved_rows = layout.rows if save_for_backward else 0
    plan = build_plan_reference(topk_ids, experts, layout.block_m)
    out, act, h = experts_reference(x, topk_ids, topk_weights, *gate_up_views(gate_proj, up_proj), down_proj,
                                    (*bias_views(gate_bias, up_bias), down_bias), (activation, alpha, limit),
                                    layout.split(plan))
    return out, plan, act[:saved_rows], h[:saved_rows]


def _forward_fake(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias,
                  activation, alpha, limit, save_for_backward):
    (tokens, hidden, _, _, intermediate), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj,
                                                           gate_bias, up_bias, down_bias, activation)
    saved_rows = layout.rows if save_for_backward else 0
    return (x.new_empty(tokens, hidden), x.new_empty(layout.size, dtype=torch.int32),
            x.new_empty(saved_rows, 2 * intermediate), x.new_empty(saved_rows, intermediate))


def _transposed(weight):
    """Strides of weight[e].T: B[e][k, n] = weight[e][n, k]."""
    return weight.stride(0), weight.stride(2), weight.stride(1)


def _empty(like, dims=1):
    """An output not asked for (of its rank: under DTensor it is placed as the output it stands for)."""
    return like.new_empty((0,) * dims)


def _backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     gate_proj: torch.Tensor, up_proj: torch.Tensor | None, down_proj: torch.Tensor,
                     gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
                     activation: str, alpha: float, limit: float,
                     plan: torch.Tensor, gate_up_act: torch.Tensor, weighted_h: torch.Tensor,
                     needs_x: bool, needs_weights: bool, needs_params: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, H], d(topk_weights) [T, K], d(gate|up) [E, 2I, H], d(down) [E, H, I], d(gate|up bias) [E, 2I],
    d(down bias) [E, H]); each empty unless needed (the bias gradients also without biases)."""
    (tokens, hidden, top_k, experts, intermediate), layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj,
                                                                     down_proj, gate_bias, up_bias, down_bias,
                                                                     activation)
    gate, up = gate_up_views(gate_proj, up_proj)
    grad_out = grad_out.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    routing_weights = topk_weights.contiguous().view(-1)
    # d(loss)/d(gate | up pre-activations), rows in plan order
    grad_act = x.new_empty(layout.rows, 2 * intermediate)
    # d(weight) partial sums; rows of unrouted ids (no tile covers them) are left unset: over_topk skips them
    partials = torch.empty(layout.rows if needs_weights else 0, cdiv(intermediate, PARTIAL_GRAIN.value),
                           dtype=torch.float32, device=x.device)
    expert_rows_gemm(GRAD_H, plan, layout, grad_out, down_proj, down_proj.stride(), grad_act, intermediate, hidden,
                     top_k, act=gate_up_act, routing_weights=routing_weights, partials=partials,
                     extra_output=needs_weights, gating=(activation, alpha, limit))
    dx_rows = None
    if needs_x:
        dx_rows = x.new_empty(layout.rows, hidden)
        expert_rows_gemm(GRAD_X, plan, layout, grad_act, gate, gate.stride(), dx_rows, hidden, intermediate, top_k,
                         b2=up, b2_strides=up.stride())
    dx = x.new_empty(tokens, hidden) if needs_x else _empty(x)
    d_weights = topk_weights.new_empty(tokens * top_k) if needs_weights else _empty(x)  # viewed [T, K] at the end
    if needs_x or needs_weights:  # dx summed over k and d(weight) (with the down bias's share), one launch
        over_topk(topk_ids.contiguous(), experts, dx_rows, dx, partials=partials if needs_weights else None,
                  grad_out=grad_out, down_bias=down_bias if needs_weights else None,
                  d_weights=d_weights if needs_weights else None)
    d_gate_up, d_down, d_gate_up_bias, d_down_bias = _empty(x, 3), _empty(x, 3), _empty(x), _empty(x)
    if needs_params:
        d_gate_up = gate.new_empty(experts, 2 * intermediate, hidden)
        d_down = down_proj.new_empty(experts, hidden, intermediate)
        if gate_bias is not None:
            d_gate_up_bias, d_down_bias = x.new_empty(experts, 2 * intermediate), x.new_empty(experts, hidden)
        expert_weight_grads(plan, layout, grad_act, x, d_gate_up, grad_out, weighted_h, d_down, top_k,
                            routing_weights=routing_weights, d_gate_up_bias=None if gate_bias is None else d_gate_up_bias,
                            d_down_bias=None if gate_bias is None else d_down_bias)
    d_weights = d_weights.view(tokens, top_k) if needs_weights else d_weights
    return dx, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias


def _backward_reference(grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias,
                        down_bias, activation, alpha, limit, plan, gate_up_act, weighted_h, needs_x, needs_weights,
                        needs_params):
    _, layout = _layout(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias,
                        activation)
    grads = experts_backward_reference(grad_out, x, topk_ids, topk_weights, *gate_up_views(gate_proj, up_proj),
                                       down_proj, (*bias_views(gate_bias, up_bias), down_bias),
                                       (activation, alpha, limit), layout.split(plan))
    needed = (needs_x, needs_weights, needs_params, needs_params, needs_params, needs_params)
    return tuple(g if need else _empty(x, g.dim()) for g, need in zip(grads, needed))


def _backward_fake(grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias,
                   down_bias, activation, alpha, limit, plan, gate_up_act, weighted_h, needs_x, needs_weights,
                   needs_params):
    tokens, hidden, top_k, experts, intermediate = _check(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj,
                                                          gate_bias, up_bias, down_bias, activation)
    bias_grads = needs_params and gate_bias is not None
    return (x.new_empty(tokens, hidden) if needs_x else _empty(x),
            topk_weights.new_empty(tokens, top_k) if needs_weights else _empty(x),
            gate_proj.new_empty(experts, 2 * intermediate, hidden) if needs_params else _empty(x, 3),
            down_proj.new_empty(experts, hidden, intermediate) if needs_params else _empty(x, 3),
            x.new_empty(experts, 2 * intermediate) if bias_grads else _empty(x),
            x.new_empty(experts, hidden) if bias_grads else _empty(x))


_TENSORS = slice(0, 9)  # of the forward's inputs: x, ids, weights, the six expert tensors

_call_backward = fused_op("moe_experts_backward", _backward_kernel, _backward_reference, _backward_fake,
                          lambda grad_out, x, *rest: _runs_triton(x, grad_out, *rest[:8]))


def _setup_context(ctx, inputs, output):
    _, plan, act, weighted_h = output
    ctx.mark_non_differentiable(plan, act, weighted_h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[_TENSORS], plan, act, weighted_h)
    ctx.gating, ctx.saved_activations = inputs[9:12], inputs[12]


def _split_pair(d_stacked, first, second, needs):
    """(d first, d second) from the gradient of [first; second] stacked along dim 1 (second None: first is it)."""
    if second is None:
        return (d_stacked if needs[0] else None), None
    if not any(needs):
        return None, None
    d_first, d_second = halves(d_stacked, 1)  # views; under DTensor each rank's own halves
    return (d_first if needs[0] else None), (d_second if needs[1] else None)


def _backward(ctx, grad_out, *_):
    needs = ctx.needs_input_grad  # x, ids, weights, gate, up, down, gate bias, up bias, down bias, gating, save
    if grad_out is None:
        return (None,) * 13
    if not ctx.saved_activations:
        raise RuntimeError("fuser::moe_experts_forward ran with save_for_backward=False: call fuser::moe_experts, "
                           "which saves the activations whenever a gradient is needed")
    x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias, plan, act, weighted_h = \
        ctx.saved_tensors
    dx, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias = _call_backward(
        grad_out, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias,
        *ctx.gating, plan, act, weighted_h, needs[0], needs[2], any(needs[3:9]))
    d_gate, d_up = _split_pair(d_gate_up, gate_proj, up_proj, needs[3:5])
    d_gate_bias, d_up_bias = (None, None) if gate_bias is None else _split_pair(d_gate_up_bias, gate_bias, up_bias,
                                                                                  needs[6:8])
    return (dx if needs[0] else None, None, d_weights if needs[2] else None, d_gate, d_up,
            d_down if needs[5] else None, d_gate_bias, d_up_bias, d_down_bias if needs[8] else None,
            None, None, None, None)


_call_forward = fused_op("moe_experts_forward", _forward_kernel, _forward_reference, _forward_fake,
                         lambda x, *rest: _runs_triton(x, *rest[:8]),
                         setup_context=_setup_context, backward=_backward)


@entry_op
def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_proj: torch.Tensor,
                up_proj: torch.Tensor | None, down_proj: torch.Tensor, gate_bias: torch.Tensor | None = None,
                up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, activation: str = "silu",
                alpha: float = 1.0, limit: float = 0.0) -> torch.Tensor:
    """out [T, H]; saves the backward's activations only when a gradient will be asked for. Biases, where given,
    are laid out as the weights: gate_bias [E, 2I] with up_proj None, else gate_bias and up_bias [E, I]."""
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, topk_weights, gate_proj, up_proj, down_proj, gate_bias,
                                                    up_bias, down_bias))
    return _call_forward(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, gate_bias, up_bias, down_bias,
                         activation, float(alpha), float(limit), save)[0]
