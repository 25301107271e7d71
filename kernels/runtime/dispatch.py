"""Where a fused op runs: Triton on CUDA (or on the CPU under the interpreter), else its plain-torch reference."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# The one set of dtypes the kernels compute (patterns' checks and hypothesis strategies read it here).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelLimits:
    """What a kernel family computes, stated once: patterns' checks read `kernels.<family>.LIMITS` rather
    than restating it, and calls outside it run the family's plain-torch reference."""
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
    compute_dtype: torch.dtype = torch.float32  # what they compute in: code computing in another is not theirs


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def what_runs(device: str) -> str:
    """What computes the fused ops on `device`, for people: it decides what a check of them proves."""
    if device == "cuda":
        return "Triton kernels on CUDA"
    if interpreting():
        return "Triton kernels through the interpreter"
    return ("their plain-torch references (set TRITON_INTERPRET=1 before starting Python to run the Triton "
            "kernels on the CPU, slowly)")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Launch the Triton kernel on CUDA tensors, or on CPU tensors under the interpreter.

    Anything else (a laptop CPU without the interpreter) runs the plain-torch reference,
    so the backend still works everywhere.
    """
    present = [t for t in tensors if t is not None]  # is_cuda / is_cpu: t.device.type costs ~1 us a tensor
    if not present:
        return False
    if all(t.is_cuda for t in present):
        return True
    return all(t.is_cpu for t in present) and interpreting()


def kernels_apply(*tensors: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> bool:
    """Triton where the device allows and every dtype is one the kernels compute (not float64)."""
    dtypes = [t.dtype for t in tensors if t is not None] + ([out_dtype] if out_dtype is not None else [])
    return use_triton(*tensors) and all(d in KERNEL_DTYPES for d in dtypes)
