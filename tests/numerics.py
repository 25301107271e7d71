"""The numerics contract of DESIGN.md for tests: relative L2 error against float64 (fuser.numerics.contract)."""
import torch

from fuser.numerics.contract import TF32_TOLERANCE, TOLERANCE, numerics_problem, tolerance  # noqa: F401


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ over the finite positions, in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = out.isfinite() & ref.isfinite()
    return ((out - ref)[finite].norm() / ref[finite].norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None):
    """Assert the contract: error within the dtype's tolerance (or `tol`), NaN/inf where ref has them."""
    problem = numerics_problem(out, ref, tol if tol is not None else tolerance(dtype))
    assert problem is None, f"{problem} ({dtype})"


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where a test calling a kernel directly runs it


def on_kernel_device(*tensors):
    """The tensors on KERNEL_DEVICE (a kernel called directly needs CUDA tensors on a GPU machine)."""
    return [None if t is None else t.to(KERNEL_DEVICE) for t in tensors]
