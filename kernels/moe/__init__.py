"""MoE kernels: routing (`fuser::moe_route`) and the routed SwiGLU experts (`fuser::moe_experts`).

    weights, ids = torch.ops.fuser.moe_route(router_logits, top_k, "softmax", renormalize, None, 1.0, x.dtype)
    out = torch.ops.fuser.moe_experts(x, ids, weights, gate_up_proj, None, down_proj)   # or gate, up views
    out = torch.ops.fuser.moe_experts(x, ids, weights, *expert_arguments(...))          # biases, gating
"""
from . import experts, route  # noqa: F401  (registers torch.ops.fuser.moe_*)
from .experts import LIMITS, MoELimits, expert_arguments, experts_reference, gate_up_views
from .plan import PlanLayout, build_plan, build_plan_reference
from .route import route_reference

__all__ = ["LIMITS", "MoELimits", "expert_arguments", "experts_reference", "gate_up_views", "PlanLayout", "build_plan",
           "build_plan_reference", "route_reference"]
