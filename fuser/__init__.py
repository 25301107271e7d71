"""fuser: a torch.compile backend that rewrites naive attention, norms, softmax and MoE into fused Triton kernels.

    fast = torch.compile(model, backend="fuser")   # or options={"codegen": "eager", "verify": True}
    report = fuser.explain(model, *inputs)         # what matched where, near misses and why
"""
from fuser import kernels  # noqa: F401  (registers torch.ops.fuser.*)
from fuser import logs  # noqa: F401  (TORCH_LOGS="fuser")
from fuser.backend import fuser_backend, last_report, reset_reports
from fuser.options import Options
from fuser.modules.convert import convert
from fuser.explaining import explain
from fuser.fuzzing import FuzzResult, fuzz
from fuser.report import MatchRecord, NearMiss, Report
from fuser.engine.rewriter import RewriteError

__all__ = ["Options", "fuser_backend", "last_report", "reset_reports", "explain", "Report", "MatchRecord",
           "NearMiss", "RewriteError", "fuzz", "FuzzResult", "convert"]
