"""Triton kernels and the `fuser::` torch ops that launch them.

Each module registers its ops on import. Kernels know nothing of graphs: they take
tensors and literals, and each keeps its plain-torch reference beside it.

This folder is installed as `fuser.kernels`. Run from the repository root, the folder is also
visible as a top-level `kernels`, a name transformers probes for (a PyPI package of that name
exists) and imports: under that name it registers nothing, so the ops are not defined twice.
"""
if __name__ == "fuser.kernels":
    from . import attention, gated_delta, mla_decode, moe, rms_norm, softmax  # noqa: F401  (registers torch.ops.fuser.*)
    from .runtime.flops import register_flop_formulas

    register_flop_formulas()  # what FlopCounterMode counts for each op
