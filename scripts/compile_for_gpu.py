"""Compile every Triton launch of a family's kernels for a GPU, on a machine without one, and check that each fits
the GPU's shared memory (a launch over it fails only on the GPU, with OutOfResources).

    TRITON_INTERPRET=0 python scripts/compile_for_gpu.py gated_delta moe [--arch 90] [--shared-kb 227]

Nothing runs: `launch` in the kernels' modules is replaced by one that compiles the kernel for the target with the
launch's argument types, constexprs, 16-byte divisibility (which turns on the loads' pipelining, as a real launch
does), warps and stages (an autotuned kernel: its first and last configs), and prints its shared memory; outputs
stay unwritten. The defaults are the H200's (sm90, 227 KB a block). Exit status 1 when a launch is over.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JIT functions, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
         torch.int32: "i32", torch.bool: "i1", torch.int8: "i8", torch.uint8: "u8"}


class Compiler:
    """A `launch` stand-in that compiles each distinct launch once for `target` and keeps its shared memory."""

    def __init__(self, target: GPUTarget, limit: int):
        self.target, self.limit, self.seen, self.over = target, limit, set(), []

    def __call__(self, kernel, grid, key, *args, **constexprs):
        if isinstance(kernel, triton.runtime.Autotuner):
            for config in {id(c): c for c in (kernel.configs[0], kernel.configs[-1])}.values():
                self(kernel.fn, grid, key, *args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                     num_stages=config.num_stages)
            return
        if isinstance(kernel, triton.runtime.Heuristics):
            named = {**dict(zip(_jit(kernel).arg_names, args)), **constexprs}
            self(kernel.fn, grid, key, *args, **constexprs, **{n: h(named) for n, h in kernel.values.items()})
            return
        options = {name: constexprs.pop(name) for name in ("num_warps", "num_stages") if name in constexprs}
        signature, values, attrs = {}, {}, {}
        bound = {**dict(zip(kernel.arg_names, args)), **constexprs}
        for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
            arg = bound.get(name, param.default)
            if param.is_constexpr or arg is None:
                signature[name], values[name] = "constexpr", arg
            elif isinstance(arg, torch.Tensor):
                signature[name], attrs[(i,)] = "*" + TYPES[arg.dtype], [["tt.divisibility", 16]]
            elif isinstance(arg, bool):
                signature[name] = "i1"
            elif isinstance(arg, int):
                signature[name] = "i64" if abs(arg) >= 2**31 else "i32"
                if arg % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32"
        seen = (kernel.fn.__name__, repr(sorted(values.items(), key=lambda kv: kv[0])), repr(sorted(options.items())))
        if seen in self.seen:
            return
        self.seen.add(seen)
        shared = triton.compile(ASTSource(kernel, signature=signature, constexprs=values, attrs=attrs),
                                target=self.target, options=options).metadata.shared
        flags = {n: v for n, v in values.items() if n.isupper() and isinstance(v, (int, bool, str))}
        print(f"{'OVER' if shared > self.limit else 'ok':4} {shared // 1024:4d} KB  {kernel.fn.__name__} {flags} "
              f"{options}", flush=True)
        if shared > self.limit:
            self.over.append(kernel.fn.__name__)


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def gated_delta() -> None:
    """Chunkwise forward and backward, recurrent decode: head dims 64-256, key-head groups, bf16 and fp32."""
    from fuser.kernels.gated_delta.backward import chunk_backward
    from fuser.kernels.gated_delta.chunk import chunk_forward
    from fuser.kernels.gated_delta.recurrent import recurrent_forward
    for heads_k, heads_v, d in ((16, 16, 128), (16, 32, 128), (8, 16, 256), (16, 16, 64), (4, 8, 96)):
        for dtype in (torch.bfloat16, torch.float32):
            for length in (256, 1):
                q, k = (torch.randn(1, length, heads_k, d, dtype=dtype) for _ in range(2))
                v = torch.randn(1, length, heads_v, d, dtype=dtype)
                g, beta = -torch.rand(1, length, heads_v), torch.rand(1, length, heads_v).to(dtype)
                state, out = torch.randn(1, heads_v, d, d), torch.empty_like(v)
                args = (q, k, v, g, beta, state, d ** -0.5, True, 1e-6)
                if length == 1:
                    recurrent_forward(*args, out, torch.empty_like(state))
                    continue
                chunk_forward(*args, out, torch.empty_like(state))
                chunk_backward(torch.randn_like(out), torch.randn_like(state), *args)


def moe() -> None:
    """The experts' plan, GEMMs, sum over the top k and weight gradients: OLMoE's sizes, with and without biases."""
    from fuser.kernels.moe import experts
    tokens, hidden, intermediate, n_experts, top_k = 512, 2048, 1024, 64, 8
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, dtype=torch.bfloat16)
    gate_up = torch.randn(n_experts, 2 * intermediate, hidden, dtype=torch.bfloat16)
    down = torch.randn(n_experts, hidden, intermediate, dtype=torch.bfloat16)
    for activation, biased in (("silu", False), ("silu", True), ("clamped_swiglu", True)):
        biases = (torch.randn(n_experts, 2 * intermediate, dtype=torch.bfloat16), None,
                  torch.randn(n_experts, hidden, dtype=torch.bfloat16)) if biased else (None, None, None)
        weights_and_gating = (gate_up, None, down, *biases, activation, 1.702, 7.0)
        _, plan, act, weighted_h = experts._forward_kernel(x, ids, weights, *weights_and_gating, True)
        experts._backward_kernel(torch.randn_like(x), x, ids, weights, *weights_and_gating, plan, act, weighted_h,
                                 True, True, True)


FAMILIES = {"gated_delta": gated_delta, "moe": moe}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES))
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100, H200)")
    parser.add_argument("--shared-kb", type=int, default=227, help="shared memory a block may use, in KiB")
    options = parser.parse_args()
    import fuser  # noqa: F401  (registers the ops: every kernel module is imported)
    compiler = Compiler(GPUTarget("cuda", options.arch, 32), options.shared_kb * 1024)
    for name, module in list(sys.modules.items()):
        if name.startswith("fuser.kernels") and callable(getattr(module, "launch", None)):
            module.launch = compiler
    for family in options.families:
        FAMILIES[family]()
    if compiler.over:
        print(f"over {options.shared_kb} KB of shared memory: {', '.join(compiler.over)}")
    return 1 if compiler.over else 0


if __name__ == "__main__":
    sys.exit(main())
