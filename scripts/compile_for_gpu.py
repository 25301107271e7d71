"""Compile every Triton launch of a family's kernels for a GPU, on a machine without one, and check that each fits
the GPU's shared memory (a launch over it fails only on the GPU, with OutOfResources) and writes no tensor it was
given as an input, by Inductor's own mutation analysis of a traced launch.

    TRITON_INTERPRET=0 python scripts/compile_for_gpu.py gated_delta moe attention rows [--arch 90] [--shared-kb 227]

Nothing runs: `launch` in the kernels' modules is replaced by one that compiles the kernel for the target with the
launch's argument types, constexprs, 16-byte divisibility (which turns on the loads' pipelining, as a real launch
does), warps and stages (an autotuned kernel: its first and last configs), and prints its shared memory; outputs
stay unwritten. The defaults are the H200's (sm90, 227 KB a block).

The mutation check: where Inductor's generated code launches a kernel (`torch.library.wrap_triton`), it reads the
kernel's TTIR to find which tensor arguments it stores to, and clones each of them before every call; a store
whose pointer it cannot tell apart from an input (a pointer built from what a helper returned, when that helper
was given input pointers) makes it assume every argument written: q, k, v and a KV cache cloned per call, and
CUDA-graph trees skip a graph that "mutates" an input (seen on the H200). Exit status 1 when a launch is over the
shared memory or writes an input.
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


class _TargetOnly:
    """The active-driver stand-in Inductor's TTIR generation asks for the target (there is no GPU here)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target


def written_arguments(kernel, bound: dict) -> list[str] | None:
    """The tensor arguments Inductor's mutation analysis finds `kernel` storing to (None: no analysis in this
    torch); the active driver must give the target."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    except ImportError:
        return None
    accesses = identify_accessed_tensors(kernel, bound, {})
    return sorted(dep.name for dep in accesses.read_writes.writes if isinstance(bound.get(dep.name), torch.Tensor))


class Compiler:
    """A `launch` stand-in that compiles each distinct launch once for `target`, keeps its shared memory and checks
    which tensors it writes; `inputs` holds the storages of the tensors a scenario gives the kernels."""

    def __init__(self, target: GPUTarget, limit: int):
        self.target, self.limit, self.seen, self.over, self.writes_inputs = target, limit, set(), [], []
        self.inputs: set[int] = set()
        self.kept: list[torch.Tensor] = []

    def given(self, *tensors: torch.Tensor) -> None:
        """Register the tensors a scenario gives the kernels (kept alive: a freed one's memory could become an
        output's)."""
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.kept += tensors
        self.inputs.update(t.untyped_storage().data_ptr() for t in tensors)

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
        written = written_arguments(kernel, bound)
        inputs = [n for n in written or () if bound[n].untyped_storage().data_ptr() in self.inputs]
        print(f"{'OVER' if shared > self.limit else 'ok':4} {shared // 1024:4d} KB  {kernel.fn.__name__} {flags} "
              f"{options} writes {written}", flush=True)
        if shared > self.limit:
            self.over.append(kernel.fn.__name__)
        if inputs:
            print(f"WRITES INPUTS {inputs}: {kernel.fn.__name__}", flush=True)
            self.writes_inputs.append(f"{kernel.fn.__name__} ({', '.join(inputs)})")


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def gated_delta(given) -> None:
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
                given(q, k, v, g, beta, state)
                args = (q, k, v, g, beta, state, d ** -0.5, True, 1e-6)
                if length == 1:
                    recurrent_forward(*args, out, torch.empty_like(state))
                    continue
                chunk_forward(*args, out, torch.empty_like(state))
                grads = torch.randn_like(out), torch.randn_like(state)
                given(*grads)
                chunk_backward(*grads, *args)


def moe(given) -> None:
    """The router (softmax and sigmoid scoring, forward and backward), the experts' plan, GEMMs, sum over the top k
    and weight gradients: OLMoE's sizes, with and without biases."""
    from fuser.kernels.moe import experts, route
    tokens, hidden, intermediate, n_experts, top_k = 512, 2048, 1024, 64, 8
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, dtype=torch.bfloat16)
    gate_up = torch.randn(n_experts, 2 * intermediate, hidden, dtype=torch.bfloat16)
    down = torch.randn(n_experts, hidden, intermediate, dtype=torch.bfloat16)
    given(x, ids, weights, gate_up, down)
    logits, score_bias = torch.randn(tokens, n_experts, dtype=torch.bfloat16), torch.randn(n_experts)
    given(logits, score_bias)
    for scoring, bias in (("softmax", None), ("sigmoid", score_bias)):
        routed, chosen = route._route_kernel(logits, top_k, scoring, True, bias, 1.0, torch.bfloat16)
        grad_routed = torch.randn_like(routed)
        given(routed, chosen, grad_routed)
        route._backward_kernel(grad_routed, logits, chosen, scoring, True, 1.0)
    for activation, biased in (("silu", False), ("silu", True), ("clamped_swiglu", True)):
        biases = (torch.randn(n_experts, 2 * intermediate, dtype=torch.bfloat16), None,
                  torch.randn(n_experts, hidden, dtype=torch.bfloat16)) if biased else (None, None, None)
        given(*biases)
        weights_and_gating = (gate_up, None, down, *biases, activation, 1.702, 7.0)
        _, plan, act, weighted_h = experts._forward_kernel(x, ids, weights, *weights_and_gating, True)
        grad = torch.randn_like(x)
        given(grad, plan, act, weighted_h)  # the backward's inputs
        experts._backward_kernel(grad, x, ids, weights, *weights_and_gating, plan, act, weighted_h, True, True, True)


def attention(given) -> None:
    """Attention forward (causal, split over keys, an added mask, sinks) and backward (with the mask's gradient),
    GQA, bf16, head dims 64 and 128; and the absorbed-MLA decode, split and not. The plan is made as on a GPU."""
    from fuser.kernels.attention import AttentionLiterals, plan
    from fuser.kernels.mla_decode.decode import mla_decode_launch
    plan.use_triton = lambda *tensors: True  # the plan's device check: these CPU tensors stand for a GPU's
    for d in (64, 128):
        q = torch.randn(2, 8, 256, d, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, 256, d, dtype=torch.bfloat16) for _ in range(2))
        bias, sinks, grad = torch.randn(1, 8, 256, 256, dtype=torch.bfloat16), torch.randn(8), torch.randn_like(q)
        given(q, k, v, bias, sinks, grad)
        for causal, mask, with_sinks, splits in ((True, None, False, None), (False, None, True, 3),
                                                 (False, bias, False, None)):
            literals = AttentionLiterals(d ** -0.5, causal, masking="add" if mask is not None else "fill")
            launches = plan.build_plan(q, k, v, mask, literals, sinks if with_sinks else None)
            out, stats, classes = plan.forward(launches, q, k, v, mask, None, sinks if with_sinks else None,
                                               num_splits=splits)
            given(out, stats, classes)
            plan.backward(launches, grad, q, k, v, mask, out, stats, classes, None, sinks if with_sinks else None,
                          mask_grad=mask is not None)
    q_lat, q_pe = torch.randn(1, 1, 128, 512, dtype=torch.bfloat16), torch.randn(1, 1, 128, 64, dtype=torch.bfloat16)
    for context in (300, 16384):
        c, k_pe = torch.randn(1, context, 512, dtype=torch.bfloat16), torch.randn(1, context, 64, dtype=torch.bfloat16)
        given(q_lat, q_pe, c, k_pe)
        mla_decode_launch(q_lat, q_pe, c, k_pe, 0.1)


def rows(given) -> None:
    """RMSNorm and softmax, forward and backward, rows that fit a program and rows that do not."""
    from fuser.kernels.rms_norm import rms_norm_backward_launch, rms_norm_forward_launch
    from fuser.kernels.softmax import softmax_backward_launch, softmax_forward_launch
    for cols in (2048, 32000):
        x, weight, grad = torch.randn(64, cols, dtype=torch.bfloat16), torch.rand(cols), torch.randn(64, cols)
        given(x, weight, grad)
        rms_norm_forward_launch(x, weight, 1e-6, 0.0, False, torch.bfloat16)
        rms_norm_backward_launch(grad.bfloat16(), x, weight, 1e-6, 0.0)
        softmax_forward_launch(x, torch.bfloat16)
        softmax_backward_launch(grad.bfloat16(), x)


FAMILIES = {"gated_delta": gated_delta, "moe": moe, "attention": attention, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES))
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100, H200)")
    parser.add_argument("--shared-kb", type=int, default=227, help="shared memory a block may use, in KiB")
    options = parser.parse_args()
    import fuser  # noqa: F401  (registers the ops: every kernel module is imported)
    target = GPUTarget("cuda", options.arch, 32)
    triton.runtime.driver.set_active(_TargetOnly(target))  # nothing launches here: the target is all it is asked
    compiler = Compiler(target, options.shared_kb * 1024)
    for name, module in list(sys.modules.items()):
        if name.startswith("fuser.kernels") and callable(getattr(module, "launch", None)):
            module.launch = compiler
    for family in options.families:
        FAMILIES[family](compiler.given)
    if compiler.over:
        print(f"over {options.shared_kb} KB of shared memory: {', '.join(compiler.over)}")
    if compiler.writes_inputs:
        print(f"writing an input, by Inductor's analysis: {', '.join(compiler.writes_inputs)}")
    return 1 if compiler.over or compiler.writes_inputs else 0


if __name__ == "__main__":
    sys.exit(main())
