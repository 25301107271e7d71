"""The attention forms issue 14 adds, against plain attention of the same shape (H200 target: within 10%).

    python benchmarks/bench_attention_forms.py

bf16, q/k/v as [B, H, L, D] views of [B, L, H, D] memory; forward and forward + backward, do_bench medians
(host time included) and the ratio form / plain. Forms: sinks (one learned logit per head, gpt-oss), a learned
additive bias [1, H, L, L] (T5's position bias), each with its own gradient in the backward.
"""
from __future__ import annotations

import torch
import triton

from fuser.kernels.attention import AttentionLiterals

SHAPES = [(4, 32, 8, 2048, 128, True), (8, 16, 16, 1024, 64, True), (1, 64, 8, 8192, 64, True)]


def _inputs(b, hq, hkv, length, d):
    def one(h):
        return torch.randn(b, length, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    return one(hq), one(hkv), one(hkv)


def _timings(call, leaves):
    out = call()
    grad = torch.randn_like(out)
    forward = triton.testing.do_bench(call, warmup=25, rep=200)
    step = triton.testing.do_bench(lambda: torch.autograd.grad(call(), leaves, grad), warmup=25, rep=200)
    return forward, step


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | form | fwd ms | fwd / plain | fwd+bwd ms | fwd+bwd / plain |")
    print("|---|---|---|---|---|---|")
    for b, hq, hkv, length, d, causal in SHAPES:
        q, k, v = _inputs(b, hq, hkv, length, d)
        sinks = torch.randn(hq, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(1, hq, length, length, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        literals = AttentionLiterals(d ** -0.5, causal)
        biased = AttentionLiterals(d ** -0.5, causal, masking="add")
        forms = {"plain": (lambda: literals.call(q, k, v), (q, k, v)),
                 "sinks": (lambda: literals.call(q, k, v, sinks=sinks), (q, k, v, sinks)),
                 "learned bias": (lambda: biased.call(q, k, v, bias), (q, k, v, bias))}
        plain = None
        for name, (call, leaves) in forms.items():
            forward, step = _timings(call, leaves)
            plain = plain or (forward, step)
            print(f"| B{b} H{hq}/{hkv} L{length} D{d}{' causal' if causal else ''} | {name} | {forward:.3f} | "
                  f"{forward / plain[0]:.2f} | {step:.3f} | {step / plain[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
