"""The pattern library, in match order (the larger first): latent attention (MLA's expansion and the attention
over it) → attention (it contains a softmax) → linear attention
(chains of gated delta steps) → MoE router with its experts → MoE experts → norms → softmax."""
from fuser.patterns.attention import ATTENTION
from fuser.patterns.base import Pattern
from fuser.patterns.latent_attention import LATENT_ATTENTION
from fuser.patterns.linear_attention import LINEAR_ATTENTION
from fuser.patterns.moe import MOE
from fuser.patterns.moe_routers import MOE_ROUTER
from fuser.patterns.norms import RMS_NORM
from fuser.patterns.softmax import SOFTMAX

PATTERNS: tuple[Pattern, ...] = (LATENT_ATTENTION, ATTENTION, LINEAR_ATTENTION, MOE_ROUTER, MOE, RMS_NORM, SOFTMAX)
BY_NAME = {p.name: p for p in PATTERNS}
