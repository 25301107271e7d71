"""`fuser::gated_delta_rule` on the GPU: quick checks against float64, then timings against transformers' torch
fallback (eager and torch.compile), flash-linear-attention when importable, and a whole Qwen3-Next-shaped model.

    python benchmarks/bench_gated_delta.py [--parts checks ops decode model] [--budget-s 300]
                                           [--full-checks] [--decode-sweep] [--out DIR] [--smoke]
    python benchmarks/bench_gated_delta.py --parts compiled      (a call of its own: compiling takes minutes)

Parts, in the order given, each started only while `--budget-s` allows (what was left out is said at the end):
- checks: bf16 and fp32 against the chunkwise reference in float64 (itself tested equal to the per-token
  recurrence): decode-sized calls, prefill across chunk edges, GQA, l2norm on and off, initial states, the
  Triton backward at one shape (`--full-checks`: the long set of the first GPU call, > 200 s).
- ops: B1 T4096, B1 T8192 and B8 T2048, 16 heads, head dim 128, bf16, l2norm (Qwen3-Next's call): forward, and
  forward + backward, ours against transformers' `torch_chunk_gated_delta_rule` in eager and fla's
  `chunk_gated_delta_rule`; then where our time goes: each kernel's GPU µs per call (torch.profiler), forward and
  backward apart.
- decode: one token, B32, 16 key / 32 value heads, head dim 128: ours, transformers' recurrent fallback eager and
  compiled, fla's `fused_recurrent_gated_delta_rule`; the state's read and write in TB/s against a copy.
  `--decode-sweep`: the recurrent kernel alone over value block widths 16-128 and 1-8 warps (each checked against
  the default tiling's output), TB/s against the same run's copy.
- model: a Qwen3-Next-shaped model (4 layers, 3 gated delta net + 1 attention, hidden 2048, its real head counts,
  16 experts instead of 512), prefill 4×2048 forward and a training step, through the public API, side by side
  (`--model-sides`): transformers as it runs here (its torch fallback, or fla where transformers finds it),
  `fuser.convert(model)`, plain torch.compile of the model (the fallback's loops unrolled: its first call
  is timed) and torch.compile(model, backend="fuser") (counts of fused layers printed); then a cached decode
  step under torch.compile, plain and backend="fuser".
- compiled: transformers' chunk fallback under plain torch.compile at B1 T4096 (its loop over chunks unrolls:
  compiling takes minutes; the compile time is printed).
Times are triton.testing.do_bench medians (ms). A table comes last; the log goes to `--out` (default $OUT).
`--smoke` runs every part on CPU through the Triton interpreter at toy sizes, to catch mistakes for free.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next  # noqa: E402

import fuser  # noqa: E402
from fuser.integrations.transformers import torch_fallback  # noqa: E402
from fuser.kernels.gated_delta import chunked_reference  # noqa: E402
from fuser.numerics.contract import numerics_error, tolerance  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
CHUNK = torch_fallback(qwen3_next.torch_chunk_gated_delta_rule)
RECURRENT = torch_fallback(qwen3_next.torch_recurrent_gated_delta_rule)
# (batch, length) of the op rows, decode batch, model (batch, length), head dim: toy sizes under --smoke
OP_SIZES = ((1, 40), (2, 24)) if SMOKE else ((1, 4096), (1, 8192), (8, 2048))
DECODE_BATCH, MODEL_SIZE, D = (2, (1, 24), 16) if SMOKE else (32, (4, 2048), 128)
LOG: list[str] = []
ROWS: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


def fla_functions():
    """fla's (chunk, fused recurrent) gated delta functions, or None when flash-linear-attention is not importable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as error:  # not installed, or built for another torch
        log(f"flash-linear-attention not importable ({type(error).__name__}: {error}): no fla rows")
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def inputs(batch, length, heads_k, heads_v, dk, dv, dtype, initial=False, seed=0):
    """(q, k, v, g, beta, initial_state) as Qwen3-Next makes them: g float32 and <= 0, beta in (0, 1)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE)
    g = -torch.nn.functional.softplus(randn(batch, length, heads_v)) * 0.5
    beta = torch.rand(batch, length, heads_v, generator=generator, device=DEVICE).to(dtype)
    state = randn(batch, heads_v, dk, dv) if initial else None
    return (randn(batch, length, heads_k, dk).to(dtype), randn(batch, length, heads_k, dk).to(dtype),
            randn(batch, length, heads_v, dv).to(dtype), g, beta, state)


def check(name, args, l2norm, dtype) -> bool:
    q, k, v, g, beta, state = args
    scale = q.shape[-1] ** -0.5
    if not l2norm:
        k = k / k.float().norm(dim=-1, keepdim=True).to(k.dtype)
    out, final = torch.ops.fuser.gated_delta_rule(q, k, v, g, beta, state, scale, l2norm)
    as64 = [None if t is None else t.double() for t in (q, k, v, g, beta, state)]
    ref_out, ref_final = chunked_reference(*as64, scale, l2norm)
    errors = numerics_error(out, ref_out), numerics_error(final, ref_final)
    ok = all(e <= tolerance(dtype) for e in errors)
    log(f"  {'ok  ' if ok else 'FAIL'} {name}: out {errors[0]:.2e}, final state {errors[1]:.2e} "
        f"(tolerance {tolerance(dtype):.0e})")
    return ok


def check_backward() -> bool:
    args = inputs(1, 40 if SMOKE else 300, 2, 4, D // 2, D // 2, torch.bfloat16, initial=True)
    leaves = [t.detach().requires_grad_() for t in args]
    out, final = torch.ops.fuser.gated_delta_rule(*leaves, 0.125, True)
    (out.float().square().sum() + final.sum()).backward()
    leaves64 = [t.detach().double().requires_grad_() for t in args]
    out64, final64 = chunked_reference(*leaves64, 0.125, True)
    (out64.square().sum() + final64.sum()).backward()
    errors = [numerics_error(a.grad, b.grad) for a, b in zip(leaves, leaves64)]
    ok = all(e <= tolerance(torch.bfloat16) for e in errors)
    log(f"  {'ok  ' if ok else 'FAIL'} backward 2/4 heads: dq dk dv dg dbeta dstate " + " ".join(f"{e:.1e}" for e in errors))
    return ok


def checks(full: bool) -> bool:
    log("checks against float64:")
    lengths = (1, 7, 16, 17, 64, 200, 1000) if full else ((1, 17, 70) if SMOKE else (1, 17, 200))
    cases = [(dtype, length) for dtype in (torch.bfloat16, torch.float32) for length in lengths] if full else \
        [(torch.bfloat16, length) for length in lengths] + [(torch.float32, lengths[-1])]
    results = []
    for dtype, length in cases:
        for l2norm, initial, heads in ((True, False, (16, 16)), (True, True, (4, 8)), (False, True, (2, 2))):
            name = f"{str(dtype)[6:]} T{length} heads {heads[0]}/{heads[1]} l2norm={l2norm} initial={initial}"
            results.append(check(name, inputs(2, length, *heads, D, D, dtype, initial), l2norm, dtype))
    results.append(check_backward())
    log(f"checks: {'all passed' if all(results) else 'FAILURES above'}")
    return all(results)


def bench(fn) -> float:
    if SMOKE:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=40)


def train_step(function, args):
    leaves = [t.detach().requires_grad_() for t in args]

    def step():
        out, _ = function(*leaves)
        out.sum().backward()
    return step


def ours_call(q, k, v, g, beta, state=None):
    return torch.ops.fuser.gated_delta_rule(q, k, v, g, beta, state, q.shape[-1] ** -0.5, True)


def kernel_times(function, calls: int = 1 if SMOKE else 3) -> list[tuple[str, float]]:
    """(kernel, GPU µs per call) of `function`, the largest first (torch.profiler; on CPU, the CPU ops)."""
    from torch.profiler import ProfilerActivity, profile
    function()
    with profile(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            function()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    on_device = torch.autograd.DeviceType.CUDA if DEVICE == "cuda" else torch.autograd.DeviceType.CPU
    totals = [(e.key, (e.self_device_time_total if DEVICE == "cuda" else e.self_cpu_time_total) / calls)
              for e in profiler.key_averages() if e.device_type == on_device]
    return sorted([t for t in totals if t[1] > 0], key=lambda t: -t[1])


def log_kernel_times(name: str, args) -> None:
    """Our forward's and backward's (recomputed intermediates included) kernels, GPU µs per call."""
    leaves = [t.detach().requires_grad_() for t in args]
    out, _ = ours_call(*leaves)
    grad_out = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            ours_call(*args)
    for phase, function in (("forward", forward),
                            ("backward", lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True))):
        times = kernel_times(function)
        log(f"  {name} fuser {phase} by kernel (µs per call, total {sum(t for _, t in times):.0f}): "
            + ", ".join(f"{kernel[:48]} {t:.0f}" for kernel, t in times[:8]))


def ops_part(fla) -> None:
    log("ops (bf16, l2norm, 16 heads):")
    for batch, length in OP_SIZES:
        args = inputs(batch, length, 16, 16, D, D, torch.bfloat16)[:5]
        peers = {"fuser": ours_call,
                 "fallback eager": lambda *a: CHUNK(*a, output_final_state=True, use_qk_l2norm_in_kernel=True)}
        if fla is not None:
            peers["fla"] = lambda *a: fla[0](*a, output_final_state=True, use_qk_l2norm_in_kernel=True)
        name = f"B{batch} T{length} H16 D{D}"
        for peer, function in peers.items():
            with torch.no_grad():
                forward = bench(lambda: function(*args))
            try:
                train = f"{bench(train_step(function, args)):.3f}"
            except RuntimeError as error:  # fla 0.6.0 refuses its gated backward on Triton < 3.7.1 on Hopper
                train = f"refused: {str(error).splitlines()[0][:90]}"
            log(f"  {name} {peer}: forward {forward:.3f} ms, fwd+bwd {train}")
            ROWS.append(f"| {name} | {peer} | {forward:.3f} | {train} |")
        log_kernel_times(name, args)


def decode_part(fla) -> None:
    log("decode (one token, bf16, l2norm):")
    q, k, v, g, beta, state = inputs(DECODE_BATCH, 1, 16, 32, D, D, torch.bfloat16, initial=True)
    compiled = torch.compile(RECURRENT)
    # the peers get the key heads repeated per value head, as transformers calls them (5.17's fallback takes no
    # key-head groups); ours reads each key head once
    q2, k2 = (x.repeat_interleave(2, dim=2) for x in (q, k))
    peers = {"fuser": lambda: ours_call(q, k, v, g, beta, state),
             "fallback eager": lambda: RECURRENT(q2, k2, v, g, beta, state, True, True),
             "fallback compiled": lambda: compiled(q2, k2, v, g, beta, state, True, True)}
    if fla is not None:
        peers["fla"] = lambda: fla[1](q2, k2, v, g, beta, initial_state=state, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
    copy_target = torch.empty_like(state)
    with torch.no_grad():
        times = {peer: bench(function) for peer, function in peers.items()}
        t_copy = bench(lambda: copy_target.copy_(state))
    moved = 2 * state.numel() * state.element_size()  # the state read and written (q, k, v are ~1% of it)
    copy_tbps = moved / t_copy / 1e9
    for peer, t in times.items():
        tbps = moved / t / 1e9
        log(f"  decode B{DECODE_BATCH} 16/32 heads D{D} {peer}: {t * 1e3:.1f} us, state {tbps:.2f} TB/s "
            f"({100 * tbps / copy_tbps:.0f}% of copy {copy_tbps:.2f} TB/s)")
        ROWS.append(f"| decode B{DECODE_BATCH} 16/32 heads D{D} | {peer} | {t:.4f} | {100 * tbps / copy_tbps:.0f}% of copy |")


def decode_sweep() -> None:
    """The recurrent kernel alone over tilings at the decode part's call, each checked against float64."""
    from fuser.kernels.gated_delta.recurrent import RecurrentTiling, recurrent_forward, recurrent_tiling
    log("decode sweep (the recurrent kernel alone, one token, bf16, l2norm):")
    args = inputs(DECODE_BATCH, 1, 16, 32, D, D, torch.bfloat16, initial=True)
    state = args[-1]
    exact = chunked_reference(*(t.double() for t in args), D ** -0.5, True)
    out, final = torch.empty_like(args[2]), torch.empty_like(state)

    def call(tiling):
        def run():
            recurrent_forward(*args, D ** -0.5, True, 1e-6, out, final, tiling)
        return run
    copy_target = torch.empty_like(state)
    with torch.no_grad():
        t_copy = bench(lambda: copy_target.copy_(state))
    moved = 2 * state.numel() * state.element_size()
    copy_tbps = moved / t_copy / 1e9
    default = recurrent_tiling(DECODE_BATCH * 32, D, D)
    log(f"  copy of the state: {t_copy * 1e3:.1f} us, {copy_tbps:.2f} TB/s; default {default}")
    best = None
    for block_v in (16, 32, 64, 128):
        for warps in (1, 2, 4, 8):
            tiling = RecurrentTiling(block_v, warps)
            call(tiling)()
            errors = numerics_error(out, exact[0]), numerics_error(final, exact[1])
            t = bench(call(tiling))
            tbps = moved / t / 1e9
            best = min(best or (t, tiling), (t, tiling), key=lambda pair: pair[0])
            wrong = "" if max(errors) <= tolerance(torch.bfloat16) else \
                f" WRONG: errors {errors[0]:.1e} {errors[1]:.1e}"
            log(f"  BLOCK_V {block_v:3d} warps {warps}: {t * 1e3:.1f} us, state {tbps:.2f} TB/s "
                f"({100 * tbps / copy_tbps:.0f}% of copy){wrong}")
    log(f"  best: {best[1]} {best[0] * 1e3:.1f} us")
    ROWS.append(f"| decode sweep B{DECODE_BATCH} 16/32 heads D{D} | {best[1]} | {best[0]:.4f} | |")


def qwen3_next_model() -> torch.nn.Module:
    """4 layers (3 gated delta net, 1 attention) at Qwen3-Next-80B's widths and head counts, 16 experts."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    small = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                 linear_value_head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    real = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5120, num_attention_heads=16,
                num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                linear_key_head_dim=128, linear_value_head_dim=128, moe_intermediate_size=512,
                shared_expert_intermediate_size=512)
    config = Qwen3NextConfig(**(small if SMOKE else real), num_hidden_layers=4,
                             layer_types=["linear_attention"] * 3 + ["full_attention"], linear_conv_kernel_dim=4,
                             num_experts=16, num_experts_per_tok=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    return Qwen3NextForCausalLM(config).to(DEVICE, torch.float32 if SMOKE else torch.bfloat16)


MODEL_SIDES = ("transformers", "fuser.convert", "plain torch.compile", 'backend="fuser"')


def prefill_side(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The model as one side of the prefill rows runs it: as it is, converted, or compiled (plain or fuser)."""
    if name == "fuser.convert":
        return fuser.convert(copy.deepcopy(model))
    torch._dynamo.reset()
    if name == "plain torch.compile":
        return torch.compile(model)
    if name == 'backend="fuser"':
        return torch.compile(model, backend="fuser", options={"codegen": "eager"} if SMOKE else None)
    return model


def model_part(sides=MODEL_SIDES) -> None:
    """Prefill forward and a training step for each side (the compiled sides' first calls timed, and with them
    the fused layers counted), then a cached decode step under torch.compile, plain and backend="fuser"."""
    from transformers import DynamicCache
    model = qwen3_next_model()
    batch, length = MODEL_SIZE
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=DEVICE)
    log(f"model: fuser.convert fuses {fuser.convert(copy.deepcopy(model), dry_run=True).counts()}")
    with torch.no_grad():
        exact = model(ids).logits.float()
    for name in sides:
        fuser.reset_reports()
        m = prefill_side(name, model)
        started = time.perf_counter()
        with torch.no_grad():
            logits = m(ids).logits
        first_s = time.perf_counter() - started
        counts = fuser.last_report().counts() if name == 'backend="fuser"' else ""
        with torch.no_grad():
            forward = bench(lambda: m(ids))
        log(f"  prefill {batch}x{length} {name}: forward {forward:.2f} ms (first call {first_s:.0f} s {counts}), "
            f"logits vs transformers {numerics_error(logits.float(), exact):.1e}")

        def step():
            m.zero_grad(set_to_none=True)
            m(ids).logits.float().square().mean().backward()
        started = time.perf_counter()
        step()
        first_s = time.perf_counter() - started
        train = bench(step)
        log(f"  prefill {batch}x{length} {name}: training step {train:.2f} ms (first call {first_s:.0f} s)")
        ROWS.append(f"| Qwen3-Next-shaped 4 layers prefill {batch}x{length} | {name} | {forward:.2f} | {train:.2f} |")
    step_ids = ids[:, -1:]
    for name, options in (("plain torch.compile", None), ('backend="fuser"', {})):
        torch._dynamo.reset()
        fuser.reset_reports()
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
            fast = torch.compile(model) if options is None else \
                torch.compile(model, backend="fuser", options={"codegen": "eager"} if SMOKE else None)
            started = time.perf_counter()
            fast(step_ids, past_key_values=copy.deepcopy(cache), use_cache=True)
            compile_s = time.perf_counter() - started
            t = bench(lambda: fast(step_ids, past_key_values=copy.deepcopy(cache), use_cache=True))
            t_copy = bench(lambda: copy.deepcopy(cache))
        counts = fuser.last_report().counts() if options is not None else ""
        log(f"  decode step B{batch} {name}: {t - t_copy:.3f} ms (the cache's copy taken off), first call {compile_s:.0f} s"
            f" {counts}")
        ROWS.append(f"| Qwen3-Next-shaped 4 layers decode B{batch} | {name} | {t - t_copy:.3f} | |")


def compiled_part() -> None:
    batch, length = OP_SIZES[0]
    args = inputs(batch, length, 16, 16, D, D, torch.bfloat16)[:5]
    compiled = torch.compile(CHUNK)
    with torch.no_grad():
        started = time.perf_counter()
        compiled(*args, output_final_state=True, use_qk_l2norm_in_kernel=True)
        compile_s = time.perf_counter() - started
        t = bench(lambda: compiled(*args, output_final_state=True, use_qk_l2norm_in_kernel=True))
    log(f"  B{batch} T{length} fallback under torch.compile: forward {t:.3f} ms (compiling took {compile_s:.0f} s)")
    ROWS.append(f"| B{batch} T{length} H16 D{D} | fallback compiled | {t:.3f} | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["checks", "ops", "decode", "model"],
                        choices=["checks", "ops", "decode", "model", "compiled"])
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no part after this many seconds")
    parser.add_argument("--full-checks", action="store_true", help="the long check set (> 200 s on an H200)")
    parser.add_argument("--decode-sweep", action="store_true", help="the recurrent kernel's tilings, after decode")
    parser.add_argument("--model-sides", nargs="+", default=list(MODEL_SIDES), choices=MODEL_SIDES,
                        help="the model part's prefill sides, in this order")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    args = parser.parse_args()
    started = time.perf_counter()
    log(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (smoke)'}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    fla = fla_functions() if {"ops", "decode"} & set(args.parts) else None
    parts = {"checks": lambda: checks(args.full_checks), "ops": lambda: ops_part(fla),
             "decode": lambda: (decode_part(fla), args.decode_sweep and decode_sweep()), "model": lambda: model_part(args.model_sides), "compiled": compiled_part}
    skipped = []
    for name in args.parts:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(name)
            continue
        part_started = time.perf_counter()
        try:
            parts[name]()
        except Exception as error:  # one part's failure leaves the others their time
            log(f"part {name} failed: {type(error).__name__}: {error}")
        log(f"({name}: {time.perf_counter() - part_started:.0f} s)")
    log("\n| case | impl | forward ms | fwd+bwd ms |\n|---|---|---|---|")
    for row in ROWS:
        log(row)
    if skipped:
        log(f"not run (over --budget-s {args.budget_s:.0f}): {', '.join(skipped)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gated_delta.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
