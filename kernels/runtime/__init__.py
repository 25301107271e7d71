"""The host side every kernel family shares: where ops run (dispatch), launching (launch), eager calls (ops)."""
from .dispatch import KERNEL_DTYPES, KernelLimits, interpreting, kernels_apply, use_triton
from .launching import RowTiling, as_rows, cdiv, launch, next_pow2, program_slots
from .ops import direct_call

__all__ = ["KERNEL_DTYPES", "KernelLimits", "RowTiling", "as_rows", "cdiv", "direct_call", "interpreting",
           "kernels_apply", "launch", "next_pow2", "program_slots", "use_triton"]
