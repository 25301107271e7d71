"""Host cost of the fused ops inside compiled graphs, and whole models, against plain torch.compile (issue 12).

    python benchmarks/bench_host.py [--parts ops models] [--only NAME ...] [--passes fwd train] [--all-modes]
                                    [--budget-s 330] [--out DIR] [--smoke]

One run, bf16, every peer in the same process. Per fused op (a naive module fuser rewrites into that op, and
the same module under plain torch.compile, whose Inductor kernels compute the same), forward and training step,
default mode and mode="reduce-overhead": host us per call (the time to enqueue `calls` calls, the GPU left to
catch up: a queue far from full never blocks the host), GPU kernels per call and their time (profiler; the log
lists the heaviest kernels by name),
host us per kernel launched, wall time per call (do_bench). Then the whole-model rows of issue 12: RMSNorm
modules, naive causal attention, OLMoE and Qwen3-MoE with 2 layers at 512 tokens (forward and training step),
wall time in default mode, under a CUDA graph captured from the default-mode module (forwards), and GPU
kernel time. Each compiled module's output is checked against the plain-compiled one first.

Parts run in order of importance while `--budget-s` allows (compiling dominates); what was left out is said.
`--only` keeps the workloads whose name contains one of its words, `--passes` forward or training rows;
`--all-modes` times every workload (models and training steps too) in default mode and under
mode="reduce-overhead". The attention and OLMoE rows of issue 12:
    python benchmarks/bench_host.py --only "causal attention" "OLMoE 2 layers" --all-modes --budget-s 540
A short table comes last; a log and JSON lines go to `--out` (default $OUT when set). `--smoke` runs the
whole script on CPU through the Triton interpreter at toy sizes (eager codegen), to catch mistakes for free.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fuser  # noqa: E402
from fuser.models import tiny_model  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = torch.bfloat16
FUSER_OPTIONS = {"codegen": "eager"} if SMOKE else None
LOG: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


# --- the naive modules fuser rewrites -----------------------------------------------------------------------

class RMSNorm(torch.nn.Module):
    """Llama's RMSNorm, as transformers writes it."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Softmax(torch.nn.Module):
    def forward(self, x):
        return F.softmax(x.float(), dim=-1).to(x.dtype)


class CausalAttention(torch.nn.Module):
    """Naive causal attention on [B, H, S, D] q, k, v."""

    def forward(self, q, k, v):
        length = q.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        hidden = torch.triu(torch.ones(length, length, dtype=torch.bool, device=q.device), 1)
        scores = scores.masked_fill(hidden, float("-inf"))
        return F.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def moe_block(experts: int, top_k: int, hidden: int, intermediate: int) -> torch.nn.Module:
    """transformers' OLMoE sparse MoE block on the grouped_mm experts path."""
    model = tiny_model("olmoe", layers=1, dtype=DTYPE, hidden_size=hidden, intermediate_size=intermediate,
                       num_experts=experts, num_experts_per_tok=top_k, experts_implementation="grouped_mm")
    return model.model.layers[0].mlp


def causal_lm(arch: str, **sizes) -> torch.nn.Module:
    """A 2-layer transformers model of `arch`, eager attention, grouped_mm experts, bf16."""
    return tiny_model(arch, layers=2, dtype=DTYPE, experts_implementation="grouped_mm", vocab_size=1024,
                      max_position_embeddings=4096, **sizes)


def scaled(size: int, toy: int) -> int:
    return toy if SMOKE else size


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


@dataclass
class Workload:
    """A module and its inputs; `train` times forward + backward of the output's mean square (of the loss for LMs)."""
    name: str
    make: Callable  # () -> (module, inputs)
    train: bool = False


def rms_norm_workload(rows, hidden, train=False):
    return Workload(f"rms_norm {rows}x{hidden}", lambda: (RMSNorm(hidden), (randn(rows, hidden),)), train)


def softmax_workload(train=False):
    shape = (scaled(8, 1), scaled(16, 2), scaled(1024, 16), scaled(1024, 33))
    return Workload(f"softmax {'x'.join(map(str, shape))}", lambda: (Softmax(), (randn(*shape, scale=3.0),)), train)


def attention_workload(train=False):
    b, h, s, d = scaled(8, 1), scaled(16, 2), scaled(1024, 19), scaled(64, 16)
    return Workload(f"causal attention B{b} H{h} S{s} D{d}",
                    lambda: (CausalAttention(), tuple(randn(b, h, s, d) for _ in range(3))), train)


def moe_block_workload(experts, top_k, tokens, train=False):
    hidden, intermediate = scaled(2048, 32), scaled(1024, 24)
    return Workload(f"OLMoE block E{experts} top{top_k} T{tokens}",
                    lambda: (moe_block(experts, top_k, hidden, intermediate), (randn(1, tokens, hidden),)), train)


def lm_workload(arch, label, sizes, train=False):
    tokens = scaled(512, 16)

    def make():
        model = causal_lm(arch, **sizes)
        return model, (torch.randint(0, model.config.vocab_size, (1, tokens), device=DEVICE),)
    return Workload(f"{label} 2 layers T{tokens}", make, train)


OLMOE = dict(hidden_size=scaled(2048, 64), intermediate_size=scaled(1024, 32), num_attention_heads=scaled(16, 4),
             num_key_value_heads=scaled(16, 4), num_experts=scaled(64, 8), num_experts_per_tok=scaled(8, 2))
QWEN3_MOE = dict(hidden_size=scaled(2048, 64), intermediate_size=scaled(6144, 96),
                 moe_intermediate_size=scaled(768, 32), num_attention_heads=scaled(32, 4),
                 num_key_value_heads=scaled(4, 2), head_dim=scaled(128, 16), num_experts=scaled(128, 8),
                 num_experts_per_tok=scaled(8, 2))


def op_workloads():
    """Per fused op, a module that is that op once fuser has rewritten it (forward first: the rows that matter)."""
    rows, hidden = scaled(4096, 8), scaled(2048, 40)
    forward = [rms_norm_workload(rows, hidden), softmax_workload(), attention_workload(),
               moe_block_workload(scaled(64, 8), scaled(8, 2), scaled(512, 16)),
               moe_block_workload(8, 8, scaled(512, 16))]  # top-k = E: the router is fused too (moe_route)
    training = [Workload(w.name, w.make, True) for w in forward]
    return forward + training


def model_workloads():
    """Issue 12's rows beyond the op rows (RMSNorm 4096x2048 and the causal attention are op rows)."""
    return [lm_workload("olmoe", "OLMoE", OLMOE), lm_workload("olmoe", "OLMoE", OLMOE, train=True),
            lm_workload("qwen3_moe", "Qwen3-MoE", QWEN3_MOE), lm_workload("qwen3_moe", "Qwen3-MoE", QWEN3_MOE, True),
            rms_norm_workload(scaled(16384, 8), scaled(4096, 40))]


# --- running and timing ---------------------------------------------------------------------------------------

def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def step_of(module, inputs, train):
    """A call of `module` on `inputs`: forward under no_grad, or forward + backward."""
    is_lm = hasattr(module, "config") and hasattr(module, "lm_head")
    if not train:
        def forward():
            with torch.no_grad():
                out = module(*inputs)
                return out.logits if is_lm else out
        return forward
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        out = module(*inputs, labels=inputs[0]) if is_lm else module(*inputs)
        loss = out.loss if is_lm else out.float().square().mean()
        loss.backward()
        return out.logits if is_lm else out
    return step


def prepared(workload: Workload):
    module, inputs = workload.make()
    module = module.to(DEVICE).to(DTYPE)
    module.train(workload.train)
    if workload.train:
        inputs = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs)
    else:
        module.requires_grad_(False)
    return module, inputs


def compiled(module, backend: str, mode: str | None):
    """A copy of `module` under torch.compile: plain (Inductor) or backend="fuser", in `mode`."""
    torch._dynamo.reset()
    fuser.reset_reports()
    copied = copy.deepcopy(module)
    if backend == "fuser":
        settings = dict(mode=mode) if mode else dict(options=FUSER_OPTIONS) if FUSER_OPTIONS else {}
        return torch.compile(copied, backend=fuser.fuser_backend, **settings)
    return torch.compile(copied, backend="aot_eager") if SMOKE else torch.compile(copied, mode=mode)


def enqueue_us(fn, calls: int) -> float:
    """Host time per call: `calls` calls enqueued back to back, timed before the GPU is waited for."""
    synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - started
    synchronize()
    return host / calls * 1e6


def gpu_kernels(fn, calls: int) -> tuple[float, float, dict]:
    """(GPU us per call summed over its kernels and copies, how many per call, {kernel name: (calls, us) per
    call}), from the profiler."""
    if DEVICE != "cuda":
        return float("nan"), float("nan"), {}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    synchronize()
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fn()
        synchronize()
    device = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names: dict = {}
    for e in device:
        count, us = names.get(e.name[:90], (0, 0.0))
        names[e.name[:90]] = (count + 1 / calls, us + e.time_range.elapsed_us() / calls)
    return (sum(e.time_range.elapsed_us() for e in device) / calls, len(device) / calls,
            {name: (round(n, 2), round(us, 1)) for name, (n, us) in sorted(names.items(), key=lambda i: -i[1][1])})


def wall_ms(fn) -> float:
    if DEVICE != "cuda":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def captured(fn, label: str):
    """`fn` replayed from one CUDA graph (it must not sync the host), or None where it cannot be captured."""
    if DEVICE != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # a sync or a graph break that cannot be captured: said, and the row goes on
        say(f"CUDA graph capture failed ({label}): {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return None
    return graph.replay


def relative_error(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure(workload: Workload, modes, calls: int) -> list[dict]:
    """Rows for `workload`: per mode, plain torch.compile and fuser side by side; default-mode forwards also
    replayed from a CUDA graph captured from the compiled module."""
    module, inputs = prepared(workload)
    rows = []
    for mode in modes:
        results = {}
        for backend in ("inductor", "fuser"):
            started = time.perf_counter()
            fn = step_of(compiled(module, backend, mode), inputs, workload.train)
            out = fn().detach().clone()  # CUDA-graph trees overwrite their outputs at the next replay
            fn()
            synchronize()
            counts = fuser.last_report().counts() if backend == "fuser" else {}
            gpu_us, kernels, names = gpu_kernels(fn, calls)
            result = dict(compile_s=time.perf_counter() - started, out=out, counts=counts, gpu_us=gpu_us,
                          kernels=kernels, kernel_names=names, host_us=enqueue_us(fn, calls), wall_ms=wall_ms(fn))
            replay = captured(fn, f"{workload.name}, {backend}") if mode is None and not workload.train else None
            result["graph_ms"] = wall_ms(replay) if replay is not None else float("nan")
            results[backend] = result
        plain, ours = results["inductor"], results["fuser"]
        row = dict(workload=workload.name, train=workload.train, mode=mode or "default", counts=ours["counts"],
                   error=relative_error(ours.pop("out"), plain.pop("out")),
                   **{f"{key}_{side}": value for side, r in (("plain", plain), ("fuser", ours))
                      for key, value in r.items() if key not in ("counts", "kernel_names")})
        for side, r in (("plain", plain), ("fuser", ours)):  # which kernels run, heaviest first (the log only)
            say(f"  kernels {side} ({mode or 'default'}): {json.dumps(dict(list(r['kernel_names'].items())[:12]))}")
        rows.append(row)
        say(json.dumps(row, default=str))
    return rows


# --- tables ---------------------------------------------------------------------------------------------------

def op_table(rows) -> list[str]:
    lines = ["| fused op workload | pass | mode | host us/call plain / fuser | kernels/call plain / fuser | "
             "host us/kernel plain / fuser | GPU us plain / fuser | wall ms plain / fuser | x | "
             "CUDA graph ms plain / fuser | fuser matched | err |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_kernel = [r[f"host_us_{s}"] / r[f"kernels_{s}"] if r[f"kernels_{s}"] else float("nan")
                      for s in ("plain", "fuser")]
        lines.append(
            f"| {r['workload']} | {'train' if r['train'] else 'fwd'} | {r['mode']} | {r['host_us_plain']:.1f} / "
            f"{r['host_us_fuser']:.1f} | {r['kernels_plain']:.0f} / {r['kernels_fuser']:.0f} | {per_kernel[0]:.1f} / "
            f"{per_kernel[1]:.1f} | {r['gpu_us_plain']:.1f} / {r['gpu_us_fuser']:.1f} | {r['wall_ms_plain']:.3f} / "
            f"{r['wall_ms_fuser']:.3f} | {r['wall_ms_plain'] / r['wall_ms_fuser']:.2f} | {r['graph_ms_plain']:.3f} / "
            f"{r['graph_ms_fuser']:.3f} | {r['counts']} | {r['error']:.1e} |")
    return lines


def model_table(rows) -> list[str]:
    lines = ["| workload | pass | mode | plain ms | fuser ms | x | plain CUDA graph | fuser CUDA graph | x | "
             "plain GPU ms | fuser GPU ms | x | fuser matched | err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {'train' if r['train'] else 'fwd'} | {r['mode']} | {r['wall_ms_plain']:.3f} | "
            f"{r['wall_ms_fuser']:.3f} | {r['wall_ms_plain'] / r['wall_ms_fuser']:.2f} | {r['graph_ms_plain']:.3f} | "
            f"{r['graph_ms_fuser']:.3f} | {r['graph_ms_plain'] / r['graph_ms_fuser']:.2f} | "
            f"{r['gpu_us_plain'] / 1e3:.3f} | {r['gpu_us_fuser'] / 1e3:.3f} | "
            f"{r['gpu_us_plain'] / r['gpu_us_fuser']:.2f} | {r['counts']} | {r['error']:.1e} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["ops", "models"], choices=["ops", "models"])
    parser.add_argument("--only", nargs="+", help="workloads whose name contains one of these")
    parser.add_argument("--passes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"],
                        help="forward rows, training-step rows or both")
    parser.add_argument("--all-modes", action="store_true", help="every workload also under reduce-overhead")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no workload after this many seconds")
    parser.add_argument("--calls", type=int, default=50, help="calls per host and profiler measurement")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    args = parser.parse_args()
    started = time.perf_counter()
    versions = f"torch {torch.__version__}, triton {__import__('triton').__version__}"
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    say(f"# bench_host: {device}, {versions}, {DTYPE}")
    plan = [("ops", w) for w in op_workloads()] if "ops" in args.parts else []
    plan += [("models", w) for w in model_workloads()] if "models" in args.parts else []
    if args.only:
        plan = [(part, w) for part, w in plan if any(word in w.name for word in args.only)]
    plan = [(part, w) for part, w in plan if ("train" if w.train else "fwd") in args.passes]
    plan.sort(key=lambda part_workload: part_workload[1].train)  # forwards first
    done, skipped = {"ops": [], "models": []}, []
    for part, workload in plan:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(f"{workload.name} ({'train' if workload.train else 'fwd'}, {part})")
            continue
        say(f"## {part}: {workload.name} {'train' if workload.train else 'fwd'} "
            f"({time.perf_counter() - started:.0f} s in)")
        modes = [None, "reduce-overhead"] if (part == "ops" or args.all_modes) and not SMOKE else [None]
        try:
            done[part] += measure(workload, modes, 2 if SMOKE else args.calls)
        except Exception as error:  # report and go on: the table shows the rest
            say(f"FAILED {workload.name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    say()
    say("host us/call: enqueue time of a call (GPU not waited for); kernels/call and GPU us from the profiler; "
        "x > 1: fuser faster")
    for line in op_table(done["ops"]) + [""] + model_table(done["models"]):
        say(line)
    if skipped:
        say(f"not run (over --budget-s {args.budget_s:.0f}): {', '.join(skipped)}")
    say(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_host.log"), "w") as log:
            log.write("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
