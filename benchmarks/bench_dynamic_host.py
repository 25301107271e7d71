"""Host cost of fused ops under dynamic shapes (issue 12): torch.compile(dynamic=True) against static shapes.

    python benchmarks/bench_dynamic_host.py [--only NAME ...] [--calls 200] [--out DIR] [--smoke]

Per workload (a module fuser rewrites into RMSNorm, softmax or attention, q/k/v from projections as in a
model, so head counts and head dims are static), bf16, forward under no_grad (and a training step where it
says train):
- fuser, dynamic=True: compiled once and run over every shape of the workload (a prefill's lengths, a decode
  step's growing cache): how many graphs Dynamo compiled (1 is the point), Inductor's generated code of them
  checked: no `torch.ops.fuser.*` call in it (the op opaque), our Triton kernels launched by it instead;
- fuser, static shapes (dynamic=False, the first shape) and plain torch.compile(dynamic=True), the peers;
- host us per call: `calls` calls enqueued back to back, timed before the GPU is waited for (bench_host.py's
  measure), at the first shape; the error against the eager module at the last shape.
A short table; a log and JSON lines go to `--out` (default $OUT when set). It asserts (exit 1) where a dynamic
graph calls a fused op opaquely, or recompiles. `--smoke` runs it on CPU at toy sizes through the Triton
interpreter: there the fused ops run opaquely by design (only CUDA traces launches), which the check asserts
instead, so the script's every path runs for free.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# bench_host first: under --smoke it sets TRITON_INTERPRET before fuser (and triton) are imported
from bench_host import DEVICE, DTYPE, LOG, SMOKE, RMSNorm, Softmax, enqueue_us, randn, say, scaled
from torch._inductor.utils import run_and_get_code

import fuser

OPAQUE = re.compile(r"torch\.ops\.fuser\.(\w+)")


class Attention(torch.nn.Module):
    """Naive attention over [B, T, hidden] states: projections to heads, causal (prefill) or a decode step's query
    over a cache (`cache`: k and v [B, H, L, D] before the new token's)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)

    def forward(self, x, k_cache=None, v_cache=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if k_cache is not None:
            k, v = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if k_cache is None:
            hidden = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
            scores = scores.masked_fill(hidden, float("-inf"))
        out = F.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return out.transpose(1, 2).reshape(b, t, -1)


@dataclass
class Workload:
    """A module, the inputs of each shape it runs at (one compile must serve them all), its Triton kernels."""
    name: str
    module: Callable[[], torch.nn.Module]
    shapes: list  # [inputs tuple per shape]
    kernels: tuple  # names of Triton kernels fuser launches for it (forward)
    train: bool = False


def workloads() -> list[Workload]:
    hidden, heads = scaled(4096, 64), scaled(32, 4)
    lengths = [scaled(n, n // 64 + 3) for n in (512, 384, 640, 1000)]
    cache = [scaled(n, n // 128 + 5) for n in (1024, 1025, 1026, 1100)]
    batch = scaled(8, 2)
    head_dim = hidden // heads
    prefill = [(randn(batch, t, hidden),) for t in lengths]
    decode = [(randn(batch, 1, hidden), randn(batch, heads, n, head_dim), randn(batch, heads, n, head_dim))
              for n in cache]
    rms = [(randn(batch, t, hidden),) for t in lengths]
    scores = [(randn(batch, heads, t, t),) for t in lengths]
    attention = ("_attention_forward_kernel",)
    return [
        Workload(f"rms_norm B{batch} T* {hidden}", lambda: RMSNorm(hidden), rms, ("_rms_norm_forward_kernel",)),
        Workload(f"rms_norm B{batch} T* {hidden}", lambda: RMSNorm(hidden), rms, ("_rms_norm_forward_kernel",), True),
        Workload(f"softmax B{batch} H{heads} T* T*", Softmax, scores, ("_softmax_forward_kernel",)),
        Workload(f"causal attention B{batch} H{heads} T*", lambda: Attention(hidden, heads), prefill, attention),
        Workload(f"causal attention B{batch} H{heads} T*", lambda: Attention(hidden, heads), prefill, attention, True),
        Workload(f"decode attention B{batch} H{heads} cache L*", lambda: Attention(hidden, heads), decode, attention),
    ]


def step_of(module, inputs, train):
    """A call: forward under no_grad, or forward + backward of the output's mean square."""
    if not train:
        def forward():
            with torch.no_grad():
                return module(*inputs)
        return forward

    def step():
        for p in module.parameters():
            p.grad = None
        out = module(*inputs)
        out.float().square().mean().backward()
        return out
    return step


def inputs_for(inputs, train):
    return tuple(t.detach().requires_grad_() for t in inputs) if train else inputs


def host_us(fn, calls: int) -> float:
    """bench_host's enqueue time per call, after a first call (a new shape compiles or tunes there)."""
    fn()
    return enqueue_us(fn, calls)


def compiled(module, backend: str, dynamic: bool):
    torch._dynamo.reset()
    fuser.reset_reports()
    if backend == "fuser":
        return torch.compile(module, backend=fuser.fuser_backend, dynamic=dynamic)
    return torch.compile(module, dynamic=dynamic)


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def measure(workload: Workload, calls: int) -> dict:
    torch.manual_seed(0)
    module = workload.module().to(DEVICE).to(DTYPE)
    module.train(workload.train)
    if not workload.train:
        module.requires_grad_(False)
    shapes = [inputs_for(inputs, workload.train) for inputs in workload.shapes]
    row = dict(workload=workload.name, train=workload.train)

    # fuser, dynamic=True: every shape through one compile, its generated code kept
    fast = compiled(module, "fuser", dynamic=True)

    def every_shape():
        torch._dynamo.utils.counters.clear()
        return [step_of(fast, inputs, workload.train)().detach().clone() for inputs in shapes]
    outs, codes = run_and_get_code(every_shape)  # (it resets Dynamo first: the compiles are the ones counted)
    code = "\n".join(codes)
    row["graphs"] = graphs_compiled()
    row["counts"] = fuser.last_report().counts()
    row["opaque"] = sorted(set(OPAQUE.findall(code)))
    row["kernels_in_code"] = [k for k in workload.kernels if k in code]
    with torch.no_grad():
        reference = module(*shapes[-1])
    row["error"] = ((outs[-1].double() - reference.double()).norm() / reference.double().norm()).item()
    row["host_us_fuser_dynamic"] = host_us(step_of(fast, shapes[0], workload.train), calls)

    # the peers: fuser at static shapes (the first), plain torch.compile(dynamic=True)
    static = compiled(module, "fuser", dynamic=False)
    row["host_us_fuser_static"] = host_us(step_of(static, shapes[0], workload.train), calls)
    plain = compiled(module, "inductor", dynamic=True)
    for inputs in shapes:
        step_of(plain, inputs, workload.train)()
    row["host_us_plain_dynamic"] = host_us(step_of(plain, shapes[0], workload.train), calls)

    expect_traced = DEVICE == "cuda"  # only CUDA traces launches; on CPU the ops run opaquely by design
    problems = []
    if row["graphs"] > 1:
        problems.append(f"{row['graphs']} graphs compiled for {len(shapes)} shapes (recompiled)")
    if expect_traced and row["opaque"]:
        problems.append(f"opaque fused ops in Inductor's code: {row['opaque']}")
    if expect_traced and len(row["kernels_in_code"]) < len(workload.kernels):
        problems.append(f"kernels missing from Inductor's code: {set(workload.kernels) - set(row['kernels_in_code'])}")
    if not expect_traced and not row["opaque"] and row["counts"]:
        problems.append("on CPU the fused ops should stay opaque, and no fuser op is in the code")
    row["problems"] = problems
    return row


def table(rows) -> list[str]:
    lines = ["| workload | pass | graphs (dynamic) | opaque fused ops | host us/call fuser dynamic | fuser static | "
             "plain dynamic | dynamic / static | fuser matched | err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {'train' if r['train'] else 'fwd'} | {r['graphs']} | {r['opaque'] or 'none'} | "
            f"{r['host_us_fuser_dynamic']:.1f} | {r['host_us_fuser_static']:.1f} | {r['host_us_plain_dynamic']:.1f} | "
            f"{r['host_us_fuser_dynamic'] / r['host_us_fuser_static']:.2f} | {r['counts']} | {r['error']:.1e} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="workloads whose name contains one of these")
    parser.add_argument("--calls", type=int, default=200, help="calls per host measurement")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    args = parser.parse_args()
    torch._inductor.config.force_disable_caches = True  # every compile generates (and shows) its code
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    say(f"# bench_dynamic_host: {device}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"{DTYPE}")
    rows, failed = [], False
    for workload in workloads():
        if args.only and not any(word in workload.name for word in args.only):
            continue
        say(f"## {workload.name} {'train' if workload.train else 'fwd'}")
        try:
            row = measure(workload, 2 if SMOKE else args.calls)
        except Exception as error:  # report and go on: the table shows the rest
            say(f"FAILED {workload.name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            failed = True
            continue
        say(json.dumps(row, default=str))
        for problem in row["problems"]:
            say(f"PROBLEM {workload.name}: {problem}")
        failed |= bool(row["problems"])
        rows.append(row)
    say()
    say("host us/call: enqueue time of a call at the first shape (GPU not waited for); graphs: Dynamo graphs "
        "compiled for all shapes with dynamic=True")
    for line in table(rows):
        say(line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_dynamic_host.log"), "w") as log:
            log.write("\n".join(LOG) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
