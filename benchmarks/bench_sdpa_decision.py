"""When to rewrite an SDPA call: fuser's attention kernel against the backend SDPA picks, per head dim, mask
kind and pass, on the GPU at hand (issue 14: the measured SDPA decision).

    python benchmarks/bench_sdpa_decision.py [--head-dims 64 128] [--kinds none causal padding] [--out DIR]

bf16, q/k/v [B, H, L, D] views of [B, L, H, D] memory (as models make them), two lengths per head dim with B·L
fixed. Peers in the same process, do_bench medians: `F.scaled_dot_product_attention` as a user calls it (no
backend forced: the one SDPA picks for those inputs) against `fuser::attention` on the same inputs, forward under
no_grad ("inference") and forward + backward ("training"). Mask kinds as the SDPA pattern sees them:
- none: no mask, is_causal=False;   causal: is_causal=True;
- padding: a bool [B, 1, L, L] mask that is causal with padded keys (transformers' sdpa mask); fuser reads it as
  causal + a key padding vector [B, 1, 1, L], SDPA takes the L×L tensor.
The speedup of a (head dim, mask kind, pass) is the smaller of its lengths' (conservative); the last lines are the
table for `kernels/attention/sdpa_speed.py`.
"""
from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F
import triton

from fuser.kernels.attention import AttentionLiterals

HEAD_DIMS = (64, 128)
LENGTHS = ((8, 1024), (2, 4096))  # (batch, length)
KINDS = ("none", "causal", "padding")


def _inputs(b, length, d, grad):
    heads = 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, length, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
               .transpose(1, 2).requires_grad_(grad) for _ in range(3))
    valid = torch.arange(length, device="cuda")[None, :] < torch.tensor([length - 7 * i for i in range(b)],
                                                                        device="cuda")[:, None]
    return q, k, v, valid[:, None, None, :]


def _calls(kind, q, k, v, valid):
    length, scale = q.shape[2], q.shape[-1] ** -0.5
    literals = AttentionLiterals(scale, causal=kind != "none")
    if kind == "padding":
        causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
        full = causal[None, None] & valid
        return (lambda: F.scaled_dot_product_attention(q, k, v, full),
                lambda: literals.call(q, k, v, valid))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal"),
            lambda: literals.call(q, k, v))


def _time(call, leaves, training):
    if not training:
        with torch.no_grad():
            return triton.testing.do_bench(call, warmup=25, rep=150)
    grad = torch.randn_like(call())
    return triton.testing.do_bench(lambda: torch.autograd.grad(call(), leaves, grad), warmup=25, rep=150)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    options = parser.parse_args()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16",
             "| head dim | mask | pass | B×L | SDPA ms | fuser ms | speedup |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    table = {}
    for d in options.head_dims:
        for kind in options.kinds:
            for training in (False, True):
                speedups = []
                for b, length in LENGTHS:
                    q, k, v, valid = _inputs(b, length, d, training)
                    theirs, ours = _calls(kind, q, k, v, valid)
                    sdpa_ms, fuser_ms = (_time(c, (q, k, v), training) for c in (theirs, ours))
                    speedups.append(sdpa_ms / fuser_ms)
                    line = (f"| {d} | {kind} | {'training' if training else 'inference'} | {b}×{length} | "
                            f"{sdpa_ms:.3f} | {fuser_ms:.3f} | {speedups[-1]:.2f} |")
                    print(line, flush=True)
                    lines.append(line)
                table[(d, kind, training)] = round(min(speedups), 2)
    lines.append(f"table for {torch.cuda.get_device_name()!r}: {table!r}")
    print(lines[-1])
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "sdpa_decision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
