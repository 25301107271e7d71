"""`fuser::attention` on the GPU against its peers, forward and backward, in TFLOP/s.

    python benchmarks/bench_attention.py [--prewarm 16] [--no-compile] [--variants]

Peers on the same bf16 inputs ([B, L, H, D] memory, viewed [B, H, L, D], as transformers lays
them out): SDPA with the flash backend, SDPA with the cuDNN backend, and the naive formula
under torch.compile. FLOPs: 4·B·H·Lq·Lk·D for full attention, half of it causal; the backward
counts 2.5× the forward. Times are triton.testing.do_bench medians. Before timing, bf16 results
(values and gradients) are checked against float64 on small shapes covering the features.

--prewarm N compiles every candidate config of our kernels in N processes first (autotuning
then only times them); --variants also times decode (Lq = 1) and an explicit HF-style float mask.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fuser.kernels.attention import AttentionLiterals, attention_reference, plan as attention_plan
from fuser.kernels.attention.backward import attention_dkdv_kernel, attention_dq_kernel
from fuser.kernels.attention.forward import attention_forward_kernel
from fuser.kernels.attention.reference import reference_backward

# (name, B, Hq, Hkv, L, D, causal)
CASES = [(f"B{b} H{h} L{length} D{d}{' causal' if causal else ''}", b, h, h, length, d, causal)
         for b, h, length, d in [(4, 32, 2048, 128), (1, 32, 8192, 128), (8, 16, 1024, 64), (2, 16, 4096, 64)]
         for causal in (False, True)] + [("GQA B4 H32 KV8 L2048 D128 causal", 4, 32, 8, 2048, 128, True)]
DEVICE = "cuda"
AUTOTUNED = {"forward": attention_forward_kernel, "dkdv": attention_dkdv_kernel, "dq": attention_dq_kernel}


def log(*parts):
    print(*parts, flush=True)


def flops(b, h, lq, lk, d, causal):
    return 4 * b * h * lq * lk * d * (0.5 if causal else 1.0)


def make_inputs(b, hq, hkv, lq, lk, d, dv=None, dtype=torch.bfloat16, seed=0):
    """q, k, v as [B, H, L, D] views of [B, L, H, D] memory, requiring grad."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def one(h, length, dim):
        x = torch.randn(b, length, h, dim, device=DEVICE, generator=generator, dtype=torch.float32)
        return x.to(dtype).transpose(1, 2).requires_grad_()

    return one(hq, lq, d), one(hkv, lk, d), one(hkv, lk, dv or d)


def ours(q, k, v, causal, mask=None):
    return torch.ops.fuser.attention(q, k, v, mask, q.shape[-1] ** -0.5, causal, 0, False, 0.0, 0.0, -math.inf)


def sdpa(backend):
    def run(q, k, v, causal, mask=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=q.shape[-1] ** -0.5,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return run


def naive(q, k, v, causal, mask=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def bench(fn) -> float:
    """Median milliseconds (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_microseconds(fn, calls: int = 20) -> float:
    """Host time of one call (enqueueing only, the GPU is not waited for): when it exceeds the
    GPU time, do_bench's numbers include it."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def kernel_ms(fn, calls: int = 5) -> float:
    """GPU time per call with the host out of the way: the CUDA kernels' durations in a profiler trace."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in profile.key_averages()) / calls / 1e3


def kernel_times(fn, q, k, v, causal):
    """(forward ms, backward ms) of the kernels alone (profiler); None where profiling fails."""
    try:
        forward = kernel_ms(lambda: fn(q, k, v, causal))
        out = fn(q, k, v, causal)
        grad = torch.randn_like(out)
        backward = kernel_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        return forward, backward
    except Exception as error:  # noqa: BLE001
        log(f"    profiling: {type(error).__name__}: {str(error)[:120]}")
        return None, None


def time_forward_backward(fn, q, k, v, causal):
    """(forward ms, backward ms) of fn; None where it fails (unsupported by that backend). A peer that
    does not take GQA gets K/V repeated over the group (as separate leaves)."""
    try:
        forward = bench(lambda: fn(q, k, v, causal))
    except Exception as error:  # noqa: BLE001  (a peer that does not take these inputs)
        log(f"    {getattr(fn, '__name__', fn)}: {type(error).__name__}: {str(error)[:120]}")
        if q.shape[1] == k.shape[1]:
            return None, None
        group = q.shape[1] // k.shape[1]
        k, v = (t.detach().repeat_interleave(group, dim=1).requires_grad_() for t in (k, v))
        return time_forward_backward(fn, q, k, v, causal)
    out = fn(q, k, v, causal)
    grad = torch.randn_like(out)
    try:
        backward = bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    except Exception as error:  # noqa: BLE001
        log(f"    backward: {type(error).__name__}: {str(error)[:120]}")
        backward = None
    return forward, backward


# -------------------------------------------------------------------------------------------------
# correctness first
# -------------------------------------------------------------------------------------------------

CHECKS = [  # name, B, Hq, Hkv, Lq, Lk, D, Dv, causal, window, bottom_right, softcap, mask kind, masking
    ("D128 causal", 2, 4, 4, 300, 300, 128, 128, True, 0, False, 0.0, None, "fill"),
    ("D64 full GQA 4", 2, 8, 2, 257, 333, 64, 64, False, 0, False, 0.0, None, "fill"),
    ("D32", 1, 2, 2, 200, 200, 32, 32, True, 0, False, 0.0, None, "fill"),
    ("D80 window", 1, 4, 2, 300, 300, 80, 80, True, 64, False, 0.0, None, "fill"),
    ("D96 softcap", 1, 4, 4, 190, 250, 96, 96, True, 0, True, 30.0, None, "fill"),
    ("D256", 1, 2, 1, 150, 170, 256, 256, False, 0, False, 0.0, None, "fill"),
    ("MLA 192/128", 1, 4, 4, 160, 160, 192, 128, True, 0, False, 0.0, None, "fill"),
    ("key padding", 2, 4, 2, 130, 260, 128, 128, False, 0, False, 0.0, "padding", "fill"),
    ("HF float mask", 2, 4, 4, 260, 260, 64, 64, False, 0, False, 0.0, "hf", "fill"),
    ("decode Lq=1 GQA", 2, 32, 8, 1, 3000, 128, 128, True, 0, True, 0.0, None, "fill"),
    ("Lq=7 decode padding", 2, 16, 2, 7, 2500, 64, 64, True, 0, True, 0.0, "padding", "fill"),
    # fully masked rows in each masking (reference.py): NaN, softmax over score + fill, SDPA's zeros
    ("hidden rows, fill -inf", 2, 4, 2, 150, 150, 64, 64, False, 0, False, 0.0, "hidden rows", "fill"),
    ("hidden rows, add finfo.min", 2, 4, 4, 260, 260, 64, 64, False, 0, False, 0.0, "hf", "add"),
    ("hidden rows, add -inf", 2, 4, 2, 150, 200, 128, 128, True, 0, True, 0.0, "hidden rows", "add"),
    ("hidden rows, sdpa", 2, 8, 2, 150, 150, 128, 128, True, 0, False, 0.0, "hidden rows", "sdpa"),
    ("hidden rows, sdpa decode", 2, 32, 8, 1, 3000, 128, 128, True, 0, True, 0.0, "hidden rows", "sdpa"),
    ("MLA hidden rows, sdpa", 2, 4, 4, 130, 130, 192, 128, True, 0, False, 0.0, "hidden rows", "sdpa"),
]


@contextlib.contextmanager
def autotuning_slot(slot: int, slots: int):
    """Autotuners time only the candidates whose index is `slot` mod `slots`; the others count as
    infinitely slow, so with slot ≥ slots nothing is timed and the first candidate runs (compiled once)."""
    from triton.runtime.autotuner import Autotuner
    original = Autotuner._bench

    def slot_bench(self, *args, config, **meta):
        index = self.configs.index(config)
        if index % slots != slot:
            return [math.inf] * 3
        try:
            result = original(self, *args, config=config, **meta)
        except Exception:  # noqa: BLE001  (a candidate that does not compile is no candidate)
            return [math.inf] * 3
        return list(result) if isinstance(result, (list, tuple)) else [result] * 3

    Autotuner._bench = slot_bench
    try:
        yield
    finally:
        Autotuner._bench = original
        for kernel in AUTOTUNED.values():
            kernel.cache.clear()


def run_check(check) -> str:
    """One correctness check (first candidate config only: this is about values, not speed)."""
    name, b, hq, hkv, lq, lk, d, dv, causal, window, bottom_right, softcap, mask_kind, masking = check
    with autotuning_slot(slot=1, slots=1):
        q, k, v = make_inputs(b, hq, hkv, lq, lk, d, dv)
        mask, mask_value = None, -math.inf
        if mask_kind == "padding":
            keep = torch.rand(b, 1, 1, lk, device=DEVICE) > 0.2
            keep[0, ..., : lk // 3] = False
            mask = keep.expand(b, hq, lq, lk)
        elif mask_kind == "hf":
            mask_value = torch.finfo(torch.bfloat16).min
            mask = hf_float_mask(b, lq, lk)
            mask[0, ..., :40] = mask_value  # left padding: the first rows see nothing
        elif mask_kind == "hidden rows":  # key padding hiding the whole first sequence
            keep = torch.rand(b, 1, 1, lk, device=DEVICE) > 0.2
            keep[0] = False
            mask = keep.expand(b, hq, lq, lk)
        literals = (d ** -0.5, causal, window, bottom_right, softcap, 0.0, mask_value, masking)
        try:
            out = torch.ops.fuser.attention(q, k, v, mask, *literals)
            grad = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), grad)
        except Exception as error:  # noqa: BLE001
            return f"  FAIL {name:24s} {type(error).__name__}: {str(error)[:300]}"
    plain = [t.detach().double() for t in (q, k, v)]
    mask64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    ref = attention_reference(*plain, mask64, *literals)
    ref_grads = reference_backward(grad.double(), *plain, mask64, AttentionLiterals(*literals))
    errors = []
    for value, expected in zip((out, *grads), (ref, *ref_grads)):
        same_nan = torch.equal(value.isnan(), expected.isnan())
        finite = expected.isfinite() & value.isfinite()
        errors.append(((value.double() - expected)[finite].norm() / expected[finite].norm()).item()
                      if same_nan else math.inf)
    passed = all(e <= 2e-2 for e in errors)
    return (f"  {'ok  ' if passed else 'FAIL'} {name:24s} out {errors[0]:.1e}  dq {errors[1]:.1e}  "
            f"dk {errors[2]:.1e}  dv {errors[3]:.1e}")


def check_correctness(pool) -> bool:
    """bf16 values and gradients against float64 over the features, on small shapes, in parallel."""
    lines = list(pool.map(run_check, CHECKS))
    for line in lines:
        log(line)
    return not any("FAIL" in line for line in lines)


# -------------------------------------------------------------------------------------------------
# compiling every candidate config in parallel before autotuning
# -------------------------------------------------------------------------------------------------

def hf_float_mask(b, lq, lk, dtype=torch.bfloat16):
    """transformers' eager mask: 0 where visible, finfo.min above the diagonal, [B, 1, Lq, Lk]."""
    blocked = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).triu(1)
    return torch.zeros(b, 1, lq, lk, device=DEVICE, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)


def _warm(task) -> str:
    """Autotune one kernel variant in a worker, timing only its slot of candidates (they compile
    into Triton's disk cache, so the main process's autotuning finds them compiled)."""
    (b, hq, hkv, length, d, causal, float_mask), slot, slots = task
    mask = hf_float_mask(b, length, length) if float_mask else None
    literals = (d ** -0.5, causal, 0, False, 0.0, 0.0, torch.finfo(torch.bfloat16).min if float_mask else -math.inf)
    with autotuning_slot(slot, slots):
        try:
            q, k, v = (t.detach() for t in make_inputs(b, hq, hkv, length, length, d))
            plan = attention_plan.build_plan(q, k, v, mask, AttentionLiterals(*literals))
            out, stats, classes = attention_plan.forward(plan, q, k, v, mask, None)
            attention_plan.backward(plan, torch.randn_like(out), q, k, v, mask, out, stats, classes, None)
            torch.cuda.synchronize()
            return "ok"
        except Exception as error:  # noqa: BLE001
            return f"{type(error).__name__}: {str(error)[:200]}"


def prewarm(pool, slots: int, variants: bool):
    """Compile the candidates of every kernel variant the tables use, across the pool."""
    specs = {}  # one case per kernel variant: head dim, causal, GQA
    for _, b, hq, hkv, length, d, causal in CASES:
        specs.setdefault((d, causal, hq != hkv), (b, hq, hkv, 1024, d, causal, False))
    specs = list(specs.values())
    if variants:
        specs.append((1, 32, 32, 1024, 128, False, True))
    tasks = [(spec, slot, slots) for slot in range(slots) for spec in specs]
    start = time.time()
    results = list(pool.map(_warm, tasks))
    failures = {r for r in results if r != "ok"}
    log(f"prewarm: {len(tasks)} tasks in {time.time() - start:.0f}s ({failures or 'all compiled'})")


TUNING_LOG: list[tuple[str, str, float]] = []


@contextlib.contextmanager
def recording_autotune():
    """Keep every candidate's autotuning time (median ms) for the report."""
    from triton.runtime.autotuner import Autotuner
    original = Autotuner._bench

    def recorded(self, *args, config, **meta):
        try:
            result = original(self, *args, config=config, **meta)
        except Exception as error:  # noqa: BLE001  (an experimental candidate that does not compile)
            log(f"    candidate {config} failed: {type(error).__name__}: {str(error)[:200]}")
            result = [math.inf] * 3
        median = result[0] if isinstance(result, (list, tuple)) else result
        shape = {k: meta[k] for k in ("HEAD", "RULE", "PACK_GQA") if k in meta}
        TUNING_LOG.append((f"{self.base_fn.__name__} {shape}", f"{config}", median))
        return result

    Autotuner._bench = recorded
    try:
        yield
    finally:
        Autotuner._bench = original


def capture_check(provider: str) -> str:
    """Forward and backward captured in a CUDA graph and replayed (what mode="reduce-overhead" needs).
    Everything runs on one side stream, the leaves' gradient nodes included; run it in a process of
    its own: a failed capture leaves CUDA state behind."""
    try:
        fn = ours if provider == "ours" else sdpa(SDPBackend.FLASH_ATTENTION)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), autotuning_slot(slot=1, slots=1):  # values, not speed: first candidate
            q, k, v = make_inputs(2, 8, 8, 1024, 1024, 128)
            grad = torch.randn(2, 8, 1024, 128, device=DEVICE, dtype=torch.bfloat16)

            def step():
                out = fn(q, k, v, True)
                return (out, *torch.autograd.grad(out, (q, k, v), grad))

            expected = step()
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = step()
            graph.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(captured, expected))
        return "replays the same values" if same else "replays DIFFERENT values"
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error)[:200]}"


def host_breakdown():
    """Host microseconds per forward call (B8 H16 L1024 D64 causal): where the time goes."""
    q, k, v = make_inputs(8, 16, 16, 1024, 1024, 64)
    plain = [t.detach() for t in (q, k, v)]
    literals = (64 ** -0.5, True, 0, False, 0.0, 0.0, -math.inf)
    plan = attention_plan.build_plan(*plain, None, AttentionLiterals(*literals))
    flash = sdpa(SDPBackend.FLASH_ATTENTION)
    with autotuning_slot(slot=1, slots=1):  # the config does not change host time: no tuning
        ours(*plain, True)
    for name, fn in (("plan.forward (kernel launch + allocations)", lambda: attention_plan.forward(plan, *plain, None,
                                                                                                  None)),
                     ("fuser::attention, no grad", lambda: ours(*plain, True)),
                     ("fuser::attention, inputs requiring grad", lambda: ours(q, k, v, True)),
                     ("SDPA flash, no grad", lambda: flash(*plain, True)),
                     ("SDPA flash, inputs requiring grad", lambda: flash(q, k, v, True))):
        log(f"  {name:48s} {host_microseconds(fn, calls=200):7.1f} us")


def autotune_report():
    for name, kernel in AUTOTUNED.items():
        for key, config in getattr(kernel, "cache", {}).items():
            log(f"  {name:8s} {str(key[:10]):60s} -> {config}")
    log("\ncandidate timings (ms, as autotuning measured them):")
    for kernel, config, median in TUNING_LOG:
        log(f"  {kernel:70s} {config:70s} {median:8.3f}")


# -------------------------------------------------------------------------------------------------
# the tables
# -------------------------------------------------------------------------------------------------

def main_table(compile_naive: bool):
    providers = {"ours": ours, "flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if compile_naive:
        torch._dynamo.config.recompile_limit = 64  # one graph per shape, with and without grad
        providers["compiled"] = torch.compile(naive, dynamic=False)
    rows = []
    for name, b, hq, hkv, length, d, causal in CASES:
        q, k, v = make_inputs(b, hq, hkv, length, length, d)
        work = flops(b, hq, length, length, d, causal)
        times, kernels_alone = {}, {}
        for provider, fn in providers.items():
            start = time.time()
            times[provider] = time_forward_backward(fn, q, k, v, causal)
            host = math.nan
            if provider != "compiled" and times[provider][0]:
                host = host_microseconds(lambda: fn(q, k, v, causal))
                kernels_alone[provider] = kernel_times(fn, q, k, v, causal)
            log(f"  {name:34s} {provider:8s} fwd {times[provider][0]} ms bwd {times[provider][1]} ms host {host:.0f} "
                f"us/fwd call (with grad), kernels alone {kernels_alone.get(provider)} ({time.time() - start:.0f}s)")
        rows.append((name, work, times, kernels_alone))
        del q, k, v
        torch.cuda.empty_cache()

    def tflops(work, ms, factor=1.0):
        return factor * work / (ms * 1e-3) / 1e12 if ms else float("nan")

    names = list(providers)
    for direction, column, factor in (("forward", 0, 1.0), ("backward", 1, 2.5)):
        for timing, kind in (("do_bench, host time included", 2), ("kernels alone (profiler)", 3)):
            log(f"\n{direction} TFLOP/s (bf16), {timing}")
            shown = [n for n in names if kind == 2 or n != "compiled"]
            log(f"| {'shape':34s} | " + " | ".join(f"{n:>8s}" for n in shown) + " | ours/flash | ours/cudnn |")
            log("|" + "---|" * (len(shown) + 3))
            for row in rows:
                name, work, table = row[0], row[1], row[kind]
                values = {n: tflops(work, (table.get(n) or (None, None))[column], factor) for n in shown}
                log(f"| {name:34s} | " + " | ".join(f"{values[n]:8.1f}" for n in shown)
                    + f" | {values['ours'] / values['flash']:10.2f} | {values['ours'] / values['cudnn']:10.2f} |")


def variants_table():
    """Decode, and an explicit float mask (what each costs)."""
    log("\ndecode: B8 Hq32 Hkv8 Lq1 D128, microseconds (ours: query heads packed, keys split)")
    for lk in (1024, 8192, 32768):
        q, k, v = make_inputs(8, 32, 8, 1, lk, 128)
        plain = [t.detach() for t in (q, k, v)]
        timings = {}
        for provider, fn in (("ours", ours), ("flash", sdpa(SDPBackend.FLASH_ATTENTION))):
            try:
                timings[provider] = 1e3 * bench(lambda: fn(*plain, False))
            except Exception as error:  # noqa: BLE001
                log(f"    {provider}: {type(error).__name__}: {str(error)[:120]}")
                timings[provider] = math.nan
        log(f"  Lk {lk:6d}: ours {timings['ours']:7.1f} us   flash {timings['flash']:7.1f} us   "
            f"(ours reads K/V at {2 * 8 * 8 * lk * 128 * 2 / (timings['ours'] * 1e-6) / 1e12:.2f} TB/s)")
    log("\nHF-style float mask (causal folded in, [B, 1, L, L]) vs the causal flag, B4 H32 L2048 D128, fwd/bwd ms")
    q, k, v = make_inputs(4, 32, 32, 2048, 2048, 128)
    fill = torch.finfo(torch.bfloat16).min
    mask = hf_float_mask(4, 2048, 2048)
    flag = time_forward_backward(ours, q, k, v, True)
    masked = time_forward_backward(lambda q, k, v, causal: torch.ops.fuser.attention(
        q, k, v, mask, 128 ** -0.5, False, 0, False, 0.0, 0.0, fill), q, k, v, False)
    log(f"  causal flag fwd {flag[0]} bwd {flag[1]} ms   float mask fwd {masked[0]} bwd {masked[1]} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prewarm", type=int, default=0, help="processes compiling the candidates first")
    parser.add_argument("--no-compile", action="store_true", help="leave out naive + torch.compile")
    parser.add_argument("--variants", action="store_true", help="decode and float-mask timings too")
    parser.add_argument("--checks-only", action="store_true", help="correctness, CUDA graph capture, host time")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    log(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}")
    with ProcessPoolExecutor(args.prewarm or 1, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        log("correctness, bf16 vs float64 (relative L2, limit 2e-2):")
        if not check_correctness(pool):
            log("correctness FAILED: timings below are not to be trusted")
        if args.prewarm and not args.checks_only:
            prewarm(pool, slots=8, variants=args.variants)
    if not args.checks_only:
        with recording_autotune():
            main_table(compile_naive=not args.no_compile)
            if args.variants:
                variants_table()
        log("\nautotuned configs:")
        autotune_report()
    with ProcessPoolExecutor(2, mp_context=torch.multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        results = {provider: pool.submit(capture_check, provider) for provider in ("ours", "flash")}
        for provider, result in results.items():
            log(f"CUDA graph capture of forward + backward, {provider}: {result.result()}")
    log("host time per forward call:")
    host_breakdown()


if __name__ == "__main__":
    sys.exit(main())
