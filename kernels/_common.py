"""What every kernel module shares: when to launch Triton, and dtype plumbing."""
import os

import torch

TORCH_TO_TRITON_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Launch the Triton kernel on CUDA tensors, or on CPU tensors under the interpreter.

    Anything else (a laptop CPU without the interpreter) runs the plain-torch reference,
    so the backend still works everywhere.
    """
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreting()
