"""The attention forms issue 14 adds, against plain attention of the same shape (H200 target: within 10%).

    python benchmarks/bench_attention_forms.py [--shapes 0 1 2 3] [--forms NAME ...] [--out DIR]

bf16, q/k/v as [B, H, L, D] views of [B, L, H, D] memory; forward and forward + backward, do_bench medians
(host time included) and the ratio form / plain. Forms: sinks (one learned logit per head, gpt-oss), with their
gradient in the backward; a learned additive bias [1, H, L, L] (T5's relative position bias, masking "add"),
frozen and with its gradient (the dQ kernel stores dS, summed over the batch), alone and plus an HF padding mask
[B, 1, 1, L] (one [B, H, L, L] tensor then, as the pattern passes it); SDPA with the same learned bias as its
peer (its memory-efficient backend gives attn_mask a gradient).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton

from fuser.kernels.attention import AttentionLiterals

SHAPES = [(4, 32, 8, 2048, 128, True), (8, 16, 16, 1024, 64, True), (1, 64, 8, 8192, 64, True),
          (8, 16, 16, 1024, 64, False)]  # uncausal: SDPA with the learned bias as a peer


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


def _forms(q, k, v, hq, length, causal, d):
    literals = AttentionLiterals(d ** -0.5, causal)
    added = literals._replace(masking="add")
    sinks = torch.randn(hq, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = (torch.randn(1, hq, length, length, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    frozen = bias.detach()
    padding = torch.zeros(q.shape[0], 1, 1, length, device="cuda", dtype=torch.bfloat16)
    padding[0, ..., length // 2:] = torch.finfo(torch.bfloat16).min
    group = q.shape[1] // k.shape[1]
    return {"plain": (lambda: literals.call(q, k, v), (q, k, v)),
            "sinks": (lambda: literals.call(q, k, v, sinks=sinks), (q, k, v, sinks)),
            "bias frozen": (lambda: added.call(q, k, v, frozen), (q, k, v)),
            "bias learned": (lambda: added.call(q, k, v, bias), (q, k, v, bias)),
            "bias learned + padding": (lambda: added.call(q, k, v, bias + padding), (q, k, v, bias)),
            "SDPA bias learned": (lambda: F.scaled_dot_product_attention(
                q, k, v, bias, scale=d ** -0.5, enable_gqa=group > 1), (q, k, v, bias))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="a folder for the table (forms.md)")
    parser.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))),
                        help="indices into SHAPES (each form compiles and tunes its kernels per shape: minutes)")
    parser.add_argument("--forms", nargs="+", help="only these forms (and plain, which the ratios divide by)")
    args = parser.parse_args()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
             "| shape | form | fwd ms | fwd / plain | fwd+bwd ms | fwd+bwd / plain |", "|---|---|---|---|---|---|"]
    print(*lines, sep="\n")
    for b, hq, hkv, length, d, causal in (SHAPES[i] for i in args.shapes):
        q, k, v = _inputs(b, hq, hkv, length, d)
        plain = None
        for name, (call, leaves) in _forms(q, k, v, hq, length, causal, d).items():
            if args.forms and name != "plain" and name not in args.forms:
                continue
            if name.startswith("SDPA") and causal:
                continue  # SDPA takes a mask or is_causal, not both: the learned bias rows are uncausal there
            try:
                forward, step = _timings(call, leaves)
            except RuntimeError as error:  # an SDPA backend that does not take this form
                lines.append(f"| B{b} H{hq}/{hkv} L{length} D{d} | {name} | {str(error).splitlines()[0][:60]} |")
                print(lines[-1], flush=True)
                continue
            plain = plain or (forward, step)
            lines.append(f"| B{b} H{hq}/{hkv} L{length} D{d}{' causal' if causal else ''} | {name} | {forward:.3f} | "
                         f"{forward / plain[0]:.2f} | {step:.3f} | {step / plain[1]:.2f} |")
            print(lines[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "forms.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
