"""The host side every kernel family shares: where ops run (dispatch), launching (launch, autotune), the fused-op
recipe (ops)."""
from .dispatch import KERNEL_DTYPES, KernelLimits, interpreting, kernels_apply, use_triton, what_runs
from .launching import (RowTiling, as_rows, autotune, bounded, cdiv, flat_kernel, known, launch, next_pow2,
                        program_slots)
from .ops import any_sizes, direct_call, entry_op, fused_op
from .sharding import BatchAndHeads, Intermediate, Rows, halves, register as register_sharding

__all__ = ["BatchAndHeads", "Intermediate", "KERNEL_DTYPES", "KernelLimits", "RowTiling", "Rows", "any_sizes",
           "as_rows", "autotune", "bounded", "cdiv", "direct_call", "entry_op", "flat_kernel", "fused_op", "halves",
           "interpreting", "kernels_apply", "known", "launch", "next_pow2", "program_slots", "register_sharding",
           "use_triton", "what_runs"]
