"""`fuser::gated_delta_rule` on the GPU: bf16 checks against float64, then the forward against transformers'
torch fallback and the decode step's bandwidth against a copy.

    python benchmarks/bench_gated_delta.py [--compile]

1. Checks (bf16 and fp32 inputs, against the chunkwise reference in float64, itself tested equal to the
   per-token recurrence): decode-sized calls (recurrent kernel), prefill across chunk edges, GQA (value heads
   twice the key heads), l2norm on and off, initial states; the Triton backward at one shape.
2. Forward, and forward + backward, at B1 T4096 and B8 T2048, 16 heads, head dim 128, bf16, l2norm (Qwen3-Next's
   call): ours against transformers' `torch_chunk_gated_delta_rule` in eager (and its forward under
   torch.compile with --compile: the fallback's loop over chunks unrolls, so compiling takes a while).
3. Decode: one token, B32, 16 key / 32 value heads, head dim 128 (Qwen3-Next's shapes): the state's read and
   write in TB/s against `copy_` of a tensor of the state's size, measured in the same run.
4. Where our time goes: the CUDA kernels of one forward + backward at B1 T4096 (torch.profiler).
Times are triton.testing.do_bench medians (ms).
"""
from __future__ import annotations

import argparse

import torch
import triton
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

import fuser  # noqa: F401  (registers torch.ops.fuser.*)
from fuser.kernels.gated_delta import chunked_reference
from fuser.numerics.contract import numerics_error, tolerance

DEVICE = "cuda"


def log(*parts):
    print(*parts, flush=True)


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


def check(name, args, l2norm, dtype):
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


def check_backward():
    args = inputs(1, 300, 2, 4, 64, 64, torch.bfloat16, initial=True)
    leaves = [t.detach().requires_grad_() for t in args]
    out, final = torch.ops.fuser.gated_delta_rule(*leaves, 0.125, True)
    (out.float().square().sum() + final.sum()).backward()
    leaves64 = [t.detach().double().requires_grad_() for t in args]
    out64, final64 = chunked_reference(*leaves64, 0.125, True)
    (out64.square().sum() + final64.sum()).backward()
    errors = [numerics_error(a.grad, b.grad) for a, b in zip(leaves, leaves64)]
    ok = all(e <= tolerance(torch.bfloat16) for e in errors)
    log(f"  {'ok  ' if ok else 'FAIL'} backward B1 T300 2/4 heads D64: dq dk dv dg dbeta dstate "
        + " ".join(f"{e:.1e}" for e in errors))
    return ok


def checks() -> bool:
    log("checks against float64:")
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for length in (1, 7, 16, 17, 64, 200, 1000):
            for l2norm, initial, heads in ((True, False, (16, 16)), (True, True, (4, 8)), (False, True, (2, 2))):
                name = f"{str(dtype)[6:]} T{length} heads {heads[0]}/{heads[1]} l2norm={l2norm} initial={initial}"
                results.append(check(name, inputs(2, length, *heads, 128, 128, dtype, initial), l2norm, dtype))
    results.append(check_backward())
    return all(results)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def train_step(function, args) -> callable:
    leaves = [t.detach().requires_grad_() for t in args]

    def step():
        out, _ = function(*leaves)
        out.sum().backward()
    return step


def forward_table(compile_fallback: bool) -> list[tuple]:
    rows = []
    fallback = qwen3_next.torch_chunk_gated_delta_rule.__wrapped__
    compiled = torch.compile(fallback) if compile_fallback else None
    for batch, length in ((1, 4096), (8, 2048)):
        q, k, v, g, beta, _ = inputs(batch, length, 16, 16, 128, 128, torch.bfloat16)

        def ours():
            return torch.ops.fuser.gated_delta_rule(q, k, v, g, beta, None, 128 ** -0.5, True)

        def theirs(function=fallback):
            return function(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        with torch.no_grad():
            t_ours, t_eager = bench(ours), bench(theirs)
            t_compiled = bench(lambda: theirs(compiled)) if compiled is not None else float("nan")
        t_train = bench(train_step(lambda *a: torch.ops.fuser.gated_delta_rule(*a, None, 128 ** -0.5, True),
                                   (q, k, v, g, beta)))
        t_train_eager = bench(train_step(lambda *a: fallback(*a, output_final_state=True,
                                                             use_qk_l2norm_in_kernel=True), (q, k, v, g, beta)))
        name = f"B{batch} T{length} H16 D128"
        rows.append((name, t_ours, t_eager, t_compiled, t_train, t_train_eager))
        log(f"  {name}: fuser {t_ours:.3f} ms, fallback eager {t_eager:.3f} ms ({t_eager / t_ours:.1f}x), "
            f"compiled {t_compiled:.3f} ms; fwd+bwd fuser {t_train:.3f} ms, fallback {t_train_eager:.3f} ms")
    return rows


def decode_row() -> tuple:
    batch, heads_k, heads_v, d = 32, 16, 32, 128
    q, k, v, g, beta, state = inputs(batch, 1, heads_k, heads_v, d, d, torch.bfloat16, initial=True)
    with torch.no_grad():
        t_ours = bench(lambda: torch.ops.fuser.gated_delta_rule(q, k, v, g, beta, state, d ** -0.5, True))
        t_theirs = bench(lambda: qwen3_next.torch_recurrent_gated_delta_rule.__wrapped__(
            q, k, v, g, beta, state, True, True))
        copy_target = torch.empty_like(state)
        t_copy = bench(lambda: copy_target.copy_(state))
    moved = 2 * state.numel() * state.element_size()  # the state read and written (q, k, v are ~1% of it)
    tbps, copy_tbps = moved / t_ours / 1e9, moved / t_copy / 1e9
    log(f"  decode B{batch} {heads_k}/{heads_v} heads D{d}: fuser {t_ours * 1e3:.1f} us ({tbps:.2f} TB/s, "
        f"{100 * tbps / copy_tbps:.0f}% of copy {copy_tbps:.2f} TB/s), fallback {t_theirs * 1e3:.1f} us")
    return t_ours, t_theirs, tbps, copy_tbps


def kernel_breakdown():
    """The profiler's CUDA time per kernel of one forward + backward (ours, B1 T4096 H16 D128 bf16)."""
    q, k, v, g, beta, _ = inputs(1, 4096, 16, 16, 128, 128, torch.bfloat16)
    step = train_step(lambda *a: torch.ops.fuser.gated_delta_rule(*a, None, 128 ** -0.5, True), (q, k, v, g, beta))
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        step()
        torch.cuda.synchronize()
    log(profile.key_averages().table(sort_by="device_time_total", row_limit=12))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time the fallback under torch.compile")
    options = parser.parse_args()
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    passed = checks()
    log("forward:")
    rows = forward_table(options.compile)
    log("decode:")
    decode = decode_row()
    log("kernels of one forward + backward, B1 T4096:")
    kernel_breakdown()
    log("\n| case | fuser ms | fallback eager ms | speedup | fallback compiled ms | fwd+bwd fuser ms | "
        "fwd+bwd fallback ms | speedup |")
    log("|---|---|---|---|---|---|---|---|")
    for name, ours, eager, compiled, train, train_eager in rows:
        log(f"| {name} | {ours:.3f} | {eager:.3f} | {eager / ours:.1f}x | {compiled:.3f} | {train:.3f} | "
            f"{train_eager:.3f} | {train_eager / train:.1f}x |")
    t_ours, t_theirs, tbps, copy_tbps = decode
    log(f"| decode B32 16/32 heads D128 | {t_ours:.4f} | {t_theirs:.4f} | {t_theirs / t_ours:.1f}x | "
        f"{tbps:.2f} TB/s = {100 * tbps / copy_tbps:.0f}% of copy ({copy_tbps:.2f}) | | | |")
    log(f"checks: {'all passed' if passed else 'FAILURES above'}")


if __name__ == "__main__":
    main()
