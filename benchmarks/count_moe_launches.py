"""Kernel launches of one forward and one backward of `fuser::moe_experts`, counted on the CPU.

    TRITON_INTERPRET=1 python benchmarks/count_moe_launches.py [--tokens 512 --experts 64 --top-k 8] [--bias]

bf16 as in a model (the routing weights too, as OLMoE casts them). Counts what a CUDA graph would record for the op: every Triton launch (`runtime.launch`, by kernel name) and
every aten op of the op's body that computes (a fill, a sum, a cast, an add: on CUDA each is a kernel; under
Inductor neighbouring ones may fuse into one). Allocations and views launch nothing and are not counted.
The hidden and intermediate sizes do not change the counts: they are tiny here so the interpreter is quick.
"""
import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fuser.kernels.moe as moe  # noqa: E402
from fuser.kernels.moe import experts, gemm, over_topk, plan  # noqa: E402
from fuser.kernels.runtime import ops  # noqa: E402

_SILENT = {"empty", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "_to_copy_noop"}
COUNTS: collections.Counter = collections.Counter()
_IN_LAUNCH = False  # the interpreter's own copies of a launch's tensors are not the op's


class _AtenCounter(TorchDispatchMode):
    """Counts aten ops that compute (not allocations, not views)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        schema = func._schema
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if name not in _SILENT and not view and not name.startswith("fuser") and not _IN_LAUNCH:
            COUNTS[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


_EPILOGUES = {v.value: k for k, v in vars(gemm).items() if k in ("GATE_UP", "DOWN", "GRAD_H", "GRAD_X")}


def _label(key):
    """A launch's name from its replay key: its first item, the rows GEMM's epilogue."""
    if key[0] == "rows":
        return f"gemm.{_EPILOGUES[key[1]]}"
    return key[0]


def _counting(launch):
    def counted(kernel, grid, key, *args, **constexprs):
        global _IN_LAUNCH
        COUNTS[f"triton.{_label(key)}"] += 1
        _IN_LAUNCH = True
        try:
            return launch(kernel, grid, key, *args, **constexprs)
        finally:
            _IN_LAUNCH = False
    return counted


def _instrument():
    for module in (plan, gemm, over_topk, experts):
        if hasattr(module, "launch"):
            module.launch = _counting(module.launch)
    ops._plain_eager = lambda tensors: True  # the op's body runs under the counter (not the dispatcher's op)


def count(tokens, experts_count, top_k, bias, hidden=16, intermediate=16, dtype=torch.bfloat16):
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, requires_grad=True)
    ids = torch.rand(tokens, experts_count).argsort(-1)[:, :top_k].contiguous()  # as torch.topk makes them
    weights = torch.rand(tokens, top_k).softmax(-1).requires_grad_()
    gate_up = (torch.randn(experts_count, 2 * intermediate, hidden) * 0.1).requires_grad_()
    down = (torch.randn(experts_count, hidden, intermediate) * 0.1).requires_grad_()
    biases = ((torch.randn(experts_count, 2 * intermediate) * 0.1).requires_grad_(),
              (torch.randn(experts_count, hidden) * 0.1).requires_grad_()) if bias else (None, None)
    leaves = [x, weights, gate_up, down] + [b for b in biases if b is not None]
    args = moe.expert_arguments(gate_up, down, *biases, False, ("silu", 1.0, 0.0))
    grad = torch.randn(tokens, hidden)
    torch.set_default_dtype(torch.float32)
    passes = {}
    with _AtenCounter():
        COUNTS.clear()
        out = torch.ops.fuser.moe_experts(x, ids, weights, *args)
        passes["forward"] = dict(COUNTS)
        COUNTS.clear()
        torch.autograd.grad(out, leaves, grad)
        passes["backward"] = dict(COUNTS)
    return passes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--bias", action="store_true")
    a = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the Triton kernels on the CPU)")
    _instrument()
    print(f"fuser::moe_experts, {a.tokens} tokens, {a.experts} experts, top-{a.top_k}"
          f"{', biases' if a.bias else ''}: launches per pass")
    for name, counts in count(a.tokens, a.experts, a.top_k, a.bias).items():
        print(f"{name:9} {sum(counts.values()):3}  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
