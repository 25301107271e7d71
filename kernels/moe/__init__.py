"""MoE kernels: routing (`fuser::moe_route`) and the routed SwiGLU experts (`fuser::moe_experts`).

    weights, ids = torch.ops.fuser.moe_route(router_logits, top_k, "softmax", renormalize, None, 1.0, x.dtype)
    out = torch.ops.fuser.moe_experts(x, ids, weights, gate_up_proj, None, down_proj)   # or gate, up views
    out = torch.ops.fuser.moe_experts(x, ids, weights, *expert_arguments(...))          # biases, gating
"""
import torch

from ..runtime import Intermediate, register_sharding
from . import experts, route  # noqa: F401  (registers torch.ops.fuser.moe_*)
from .experts import LIMITS, MoELimits, expert_arguments, experts_reference, gate_up_views
from .plan import PlanLayout, build_plan, build_plan_reference
from .route import route_reference

__all__ = ["LIMITS", "MoELimits", "expert_arguments", "experts_reference", "gate_up_views", "PlanLayout", "build_plan",
           "build_plan_reference", "route_reference"]

# Under DTensor, tensor parallelism's split of the experts: gate and up sharded along the intermediate dim (rows of
# [E, I, H]; a stacked gate_up [E, 2I, H] packed, a slice of each), down along it too (columns of [E, H, I]); each
# shard computes a partial sum of the output, dx and d(weights); tokens, routes and the plan replicated; with biases
# replicated. The saved pre-activations [R, 2I] are packed ([gate | up] per shard), w * h [R, I] sharded.
register_sharding(torch.ops.fuser.moe_experts_forward.default, Intermediate(
    args=((3, 1), (4, 1), (5, 2)), outputs=((2, 1), (3, 1)), summed=(0,), packed_args=((3, 4),),
    packed_outputs=(2,), unsharded_with=(6, 7, 8)))
register_sharding(torch.ops.fuser.moe_experts_backward.default, Intermediate(
    args=((4, 1), (5, 1), (6, 2), (14, 1), (15, 1)), outputs=((2, 1), (3, 2)), summed=(0, 1),
    packed_args=((4, 5), (14, None)), packed_outputs=(2,), unsharded_with=(7, 8, 9)))
