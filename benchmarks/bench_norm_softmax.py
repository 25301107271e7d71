"""fuser's RMSNorm and softmax kernels against their peers, bf16, one GPU, one run.

    python benchmarks/bench_norm_softmax.py [--sweep] [--only LABEL ...] [--out FILE] [--smoke]

First a correctness check of every case (bf16 against float64: values and gradients). Then, per
case, a device-to-device copy of the input's size, ours and the peers: eager (the HF Llama RMSNorm
formula in plain torch / `torch.softmax`), `torch.compile` (Inductor) of the same, and `F.rms_norm`.
Times are `triton.testing.do_bench` medians (L2 flushed between calls), what a caller sees: where a
call's host cost (last column) exceeds its GPU time, the GPU waits and the time includes it.
`GPU-only` times leave the host out (CUDA-graph replays, L2 flushed between calls): they compare
the kernels themselves. TB/s counts the bytes that must move: x, weight and the output read or
written once (backward: x, dy, weight read; dx, dweight written). `vs best peer` is the best
peer's time over ours; `of copy` our TB/s over the copy's. `--sweep` then breaks our host cost
down and times our kernels over a grid of tilings (how the heuristics in kernels/ were chosen).
`TRITON_INTERPRET=1 ... --smoke` runs everything on CPU through the Triton interpreter at toy
sizes, to catch mistakes for free. The markdown table comes last and goes to --out.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from fuser.kernels import rms_norm as rms_kernels, softmax as softmax_kernels
from fuser.kernels.runtime import interpreting
from fuser.kernels.rms_norm import RowTiling
from fuser.numerics.contract import numerics_problem, tolerance

DTYPE = torch.bfloat16
EPS = 1e-6
# (name, rows, cols): the shapes; --smoke shrinks them.
RMS_FORWARD = [("rms_norm fwd", 16384, 4096), ("rms_norm fwd", 32768, 8192), ("rms_norm fwd", 4096, 2048)]
RMS_TRAIN = [("rms_norm fwd+bwd", 16384, 4096)]
SOFTMAX_FORWARD = [("softmax fwd", 16384, 32000), ("softmax fwd", 131072, 2048)]
SMOKE_SHAPES = {(16384, 4096): (24, 96), (32768, 8192): (8, 300), (4096, 2048): (5, 64),
                (16384, 32000): (4, 700), (131072, 2048): (33, 50)}


@dataclass
class Config:
    device: str
    smoke: bool
    flush_ms_per_call: float | None = None  # the GPU-only timer's L2 flush, measured once

    def shape(self, rows: int, cols: int) -> tuple[int, int]:
        return SMOKE_SHAPES[(rows, cols)] if self.smoke else (rows, cols)

    def bench_ms(self, fn: Callable) -> float:
        """`do_bench` median: what a caller sees, host launch cost included where it exceeds the GPU's."""
        if self.smoke:
            return host_us(fn, calls=1) * 1e-3
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def gpu_ms(self, fn: Callable, calls: int = 20) -> float:
        """GPU time of one call, host launch cost left out: CUDA-graph replays of `calls` × (L2 flush,
        fn) minus replays of the flushes alone, per call."""
        if self.smoke:
            return host_us(fn, calls=1) * 1e-3
        flush_from = torch.empty(64 << 20, dtype=torch.int8, device=self.device)
        flush_to = torch.empty_like(flush_from)

        def replay_ms(work: Callable | None) -> float:
            def body():
                for _ in range(calls):
                    flush_to.copy_(flush_from)
                    if work is not None:
                        work()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph wants
                body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")

        if self.flush_ms_per_call is None:
            self.flush_ms_per_call = replay_ms(None) / calls
        return replay_ms(fn) / calls - self.flush_ms_per_call


def host_us(fn: Callable, calls: int = 50) -> float:
    """Host time of one call (launches queue up without waiting for the GPU)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def hf_llama_rms_norm(x, weight, eps=EPS):
    """transformers' LlamaRMSNorm.forward, verbatim in substance."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def ours_rms_norm(x, weight):
    return torch.ops.fuser.rms_norm(x, weight, EPS, 0.0, False, x.dtype)


def torch_rms_norm(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def softmax_eager(x):
    return torch.softmax(x, -1)


def ours_softmax(x):
    return torch.ops.fuser.softmax(x, x.dtype)


def training_step(norm):
    """Forward and backward of a norm: grads of x and weight for a given dy."""
    def step(x, weight, dy):
        return torch.autograd.grad(norm(x, weight), (x, weight), dy)
    return step


@dataclass
class Case:
    """One row of the table: what runs, on which inputs, how many bytes must move."""
    name: str
    rows: int
    cols: int
    inputs: tuple
    bytes_moved: int
    ours: Callable
    peers: dict[str, Callable]

    @property
    def label(self) -> str:
        return f"{self.name} {self.rows}x{self.cols}"


def make_cases(cfg: Config) -> list[Case]:
    def inputs(rows, cols, with_weight, with_grad):
        x = torch.randn(rows, cols, device=cfg.device, dtype=DTYPE, requires_grad=with_grad)
        weight = (torch.rand(cols, device=cfg.device, dtype=DTYPE) + 0.5).requires_grad_(with_grad)
        if with_grad:
            return x, weight, torch.randn(rows, cols, device=cfg.device, dtype=DTYPE)
        return (x, weight) if with_weight else (x,)

    element = DTYPE.itemsize
    cases = []
    for name, rows, cols in RMS_FORWARD:
        rows, cols = cfg.shape(rows, cols)
        cases.append(Case(name, rows, cols, inputs(rows, cols, True, False), (2 * rows * cols + cols) * element,
                          ours_rms_norm, {"eager (HF)": hf_llama_rms_norm,
                                          "inductor (HF)": torch.compile(hf_llama_rms_norm, dynamic=False),
                                          "F.rms_norm": torch_rms_norm}))
    for name, rows, cols in RMS_TRAIN:
        rows, cols = cfg.shape(rows, cols)
        forward, backward = 2 * rows * cols + cols, 3 * rows * cols + 2 * cols
        cases.append(Case(name, rows, cols, inputs(rows, cols, True, True), (forward + backward) * element,
                          training_step(ours_rms_norm),
                          {"eager (HF)": training_step(hf_llama_rms_norm),
                           "inductor (HF)": training_step(torch.compile(hf_llama_rms_norm, dynamic=False)),
                           "F.rms_norm": training_step(torch_rms_norm)}))
    for name, rows, cols in SOFTMAX_FORWARD:
        rows, cols = cfg.shape(rows, cols)
        cases.append(Case(name, rows, cols, inputs(rows, cols, False, False), 2 * rows * cols * element,
                          ours_softmax, {"eager": softmax_eager,
                                         "inductor": torch.compile(softmax_eager, dynamic=False)}))
    return cases


# ---------------------------------------------------------------------------------------------
# Correctness: bf16 against float64
# ---------------------------------------------------------------------------------------------

def check_case(case: Case) -> list[str]:
    """Problems of ours against float64 on this case's inputs (empty: all good)."""
    problems = []

    def compare(what, out, ref, dtype):
        problem = numerics_problem(out, ref, tolerance(dtype))
        error = (out.double() - ref).norm() / ref.norm()
        print(f"  {case.label:34s} {what:8s} rel L2 {error:.2e} {'OK' if problem is None else problem}")
        if problem:
            problems.append(f"{case.label} {what}: {problem}")

    x = case.inputs[0]
    x64 = x.detach().double().requires_grad_()
    if case.name.startswith("softmax"):  # the backward too, though only the forward is timed
        x = x.detach().requires_grad_()
        out, ref = ours_softmax(x), torch.softmax(x64, -1)
        dy = torch.randn_like(out)
        compare("out", out, ref, DTYPE)
        compare("dx", torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(ref, x64, dy.double())[0], DTYPE)
        return problems
    weight = case.inputs[1]
    w64 = weight.detach().double().requires_grad_()
    ref = rms_kernels.rms_norm_reference(x64, w64, EPS, 0.0, False, torch.float64)
    if len(case.inputs) == 2:
        compare("out", ours_rms_norm(x, weight), ref, DTYPE)
        return problems
    dy = case.inputs[2]
    ref_dx, ref_dw = torch.autograd.grad(ref, (x64, w64), dy.double())
    dx, dw = case.ours(*case.inputs)
    compare("dx", dx, ref_dx, DTYPE)
    compare("dweight", dw, ref_dw, DTYPE)
    return problems


# ---------------------------------------------------------------------------------------------
# Sweep: our kernels over tilings
# ---------------------------------------------------------------------------------------------

def tilings(cols: int, block_ms, block_ns=None, warps=(1, 2, 4, 8, 16)) -> list[RowTiling]:
    """Candidate tilings with 8 to 64 elements per thread (one warp: a row without cross-warp sums)."""
    block_ns = block_ns or [triton.next_power_of_2(cols)]
    return [RowTiling(m, n, w) for m, n, w in itertools.product(block_ms, block_ns, warps)
            if 8 <= m * n // (32 * w) <= 64]


def relative_error(out, reference) -> float:
    """Largest relative L2 distance over the tensors of `out` (a tensor or a tuple of them)."""
    pairs = zip(out, reference) if isinstance(out, tuple) else [(out, reference)]
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in pairs)


def host_breakdown(case: Case) -> None:
    """Where the host time of one forward call goes, layer by layer, against the peers'."""
    x, weight = case.inputs
    rows, out = rms_kernels.as_rows(x), torch.empty_like(x)
    tiling = rms_kernels.forward_tiling(*rows.shape)

    def launch_only():
        rms_kernels._rms_norm_forward_kernel[(triton.cdiv(rows.shape[0], tiling.block_m),)](
            rows, weight, out, rows.shape[0], rows.shape[1], rows.stride(0), out.stride(0), EPS, 0.0,
            HAS_WEIGHT=True, WEIGHT_BEFORE_CAST=False, INPUT_DTYPE=tl.bfloat16, PRODUCT_DTYPE=tl.bfloat16,
            BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, ROW_FITS=True, num_warps=tiling.num_warps)

    x_grad = x.detach().clone().requires_grad_()
    layers = {"Triton launch alone": launch_only,
              "launcher (rms_norm_forward_launch)":
                  lambda: rms_kernels.rms_norm_forward_launch(x, weight, EPS, 0.0, False, DTYPE),
              "op, no grad": lambda: ours_rms_norm(x, weight),
              "op, x requires grad": lambda: ours_rms_norm(x_grad, weight),
              **{f"peer: {name}": (lambda fn=fn: fn(x, weight)) for name, fn in case.peers.items()}}
    print(f"host cost per call, {case.label}:")
    for name, fn in layers.items():
        print(f"  {host_us(fn, calls=200):7.1f} us  {name}", flush=True)


def sweep(cfg: Config, cases: list[Case]) -> None:
    """Time our launchers over tilings (GPU-only time), each checked against the default tiling."""
    if not cfg.smoke and cases and cases[0].name == "rms_norm fwd":
        host_breakdown(cases[0])
    for case in cases:
        x = case.inputs[0].detach()
        block_ms = (1,) if case.cols > 8192 else (1, 2, 4)
        if case.name == "rms_norm fwd":
            weight = case.inputs[1]
            candidates = {f"{t}": (lambda t=t: rms_kernels.rms_norm_forward_launch(x, weight, EPS, 0.0, False, DTYPE,
                                                                                    t))
                          for t in [None, *tilings(case.cols, block_ms)]}
        elif case.name == "rms_norm fwd+bwd":  # the backward launcher alone
            weight, dy = case.inputs[1].detach(), case.inputs[2]
            candidates = {f"{t} programs/SM={p} stages={s}":
                          (lambda t=t, p=p, s=s: rms_kernels.rms_norm_backward_launch(dy, x, weight, EPS, 0.0, t, p, s))
                          for t in [None, *tilings(case.cols, block_ms[:2], warps=(4, 8))] for p in (1, 2, 4)
                          for s in (1, 2, 3)}
        else:
            block_ns = [b for b in (1024, 2048, 4096, 8192, 16384, 32768) if b <= triton.next_power_of_2(case.cols)]
            candidates = {f"{t}": (lambda t=t: softmax_kernels.softmax_forward_launch(x, DTYPE, t))
                          for t in [None, *tilings(case.cols, block_ms, block_ns[-4:], warps=(4, 8, 16))]}
        reference = next(iter(candidates.values()))()  # the default tiling (None)
        timed = []
        for label, fn in candidates.items():
            try:
                error = relative_error(fn(), reference)
                timed.append((cfg.gpu_ms(fn, calls=10), label, error))
            except Exception as error:  # a tiling the GPU cannot run (too many registers): skip it
                print(f"  sweep {case.label} {label}: {type(error).__name__}: {str(error)[:120]}")
        print(f"sweep {case.label} ({'backward only' if 'bwd' in case.name else 'forward'}), None = default:")
        for ms, label, error in sorted(timed)[:10]:
            differs = f"  DIFFERS from the default by {error:.1e}" if error > 1e-2 else ""
            print(f"  {ms * 1e3:8.1f} us  {label}{differs}")
        print("  default:", *(f"{ms * 1e3:.1f} us" for ms, label, _ in timed if label.startswith("None")), flush=True)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

TABLE_HEADER = ["| case | contender | ms | TB/s | vs best peer | of copy | GPU-only ms | GPU-only TB/s "
                "| GPU-only vs best peer | GPU-only of copy | host us/call |", "|---" * 11 + "|"]


def measure(cfg: Config, case: Case) -> list[str]:
    """Markdown rows of one case: copy, ours (twice, for the spread), each peer."""
    x = case.inputs[0]
    source, target = x.detach().clone(), torch.empty_like(x)
    contenders = {"copy (same size)": lambda: target.copy_(source), "ours": lambda: case.ours(*case.inputs),
                  "ours (again)": lambda: case.ours(*case.inputs),
                  **{name: (lambda fn=fn: fn(*case.inputs)) for name, fn in case.peers.items()}}
    timings = {}
    for name, fn in contenders.items():
        fn()  # compile outside the timings
        try:
            gpu = cfg.gpu_ms(fn)
        except Exception as error:  # a contender that cannot be captured in a CUDA graph
            print(f"  {case.label} {name}: no GPU-only time ({type(error).__name__}: {str(error)[:160]})")
            gpu = math.nan
        timings[name] = (cfg.bench_ms(fn), gpu, host_us(fn))
    copy_ms, copy_gpu_ms, _ = timings.pop("copy (same size)")
    copy_bytes = 2 * x.numel() * x.element_size()
    peers = [t for name, t in timings.items() if not name.startswith("ours")]
    best, best_gpu = min(t[0] for t in peers), min((t[1] for t in peers if not math.isnan(t[1])), default=math.nan)
    rows = [f"| {case.label} | copy (same size) | {copy_ms:.4f} | {copy_bytes / copy_ms * 1e-9:.2f} | | | "
            f"{copy_gpu_ms:.4f} | {copy_bytes / copy_gpu_ms * 1e-9:.2f} | | | |"]
    for name, (ms, gpu, host) in timings.items():
        mine = name.startswith("ours")
        of_copy = f"{100 * copy_ms / ms * case.bytes_moved / copy_bytes:.0f}%" if mine else ""
        gpu_of_copy = f"{100 * copy_gpu_ms / gpu * case.bytes_moved / copy_bytes:.0f}%" if mine else ""
        rows.append(f"| {case.label} | {name} | {ms:.4f} | {case.bytes_moved / ms * 1e-9:.2f} | {best / ms:.2f}x | "
                    f"{of_copy} | {gpu:.4f} | {case.bytes_moved / gpu * 1e-9:.2f} | {best_gpu / gpu:.2f}x | "
                    f"{gpu_of_copy} | {host:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="then break down host cost and time tilings")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    parser.add_argument("--only", nargs="+", help="cases whose label contains one of these (e.g. 32768x8192)")
    args = parser.parse_args()
    if args.smoke and not interpreting():
        parser.error("--smoke runs the kernels through the interpreter: set TRITON_INTERPRET=1 (before triton loads)")
    cfg = Config("cpu" if args.smoke else "cuda", args.smoke)
    device = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    header = f"device {device}, torch {torch.__version__}, triton {triton.__version__}, bf16, eps {EPS}"
    print(header)
    torch.manual_seed(0)
    cases = [c for c in make_cases(cfg) if not args.only or any(word in c.label for word in args.only)]
    print("correctness (bf16 against float64):")
    problems = [p for case in cases for p in check_case(case)]
    table = list(TABLE_HEADER)
    for case in cases:
        try:
            rows = measure(cfg, case)
        except Exception:
            traceback.print_exc()
            rows = [f"| {case.label} | failed: see the log |" + " |" * 9]
        print("\n".join(rows), flush=True)
        table += rows
    text = "\n".join([header, "", *table, "", f"correctness: {'; '.join(problems) or 'all within tolerance'}"])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.sweep:
        sweep(cfg, cases)
    print("\n" + text)


if __name__ == "__main__":
    main()
