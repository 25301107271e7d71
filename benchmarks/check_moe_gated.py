"""fuser::moe_experts with biases and GPT-OSS's clamped SwiGLU against the bias-free SwiGLU experts: bf16, one GPU.

    python benchmarks/check_moe_gated.py [--tokens 512 --experts 64 --top-k 8 --hidden 2048 --intermediate 1024]
                                         [--out DIR] [--smoke]

1. Correctness, per variant: the Triton kernels in bf16 on CUDA against the op's plain-torch reference (fp32 math)
   on the CPU on the same inputs, forward and every gradient (x, routing weights, weights, biases), against the
   contract's bf16 tolerance. With GPT-OSS's limit (7) the clamps hardly bite at these scales; a second run with
   limit 0.5 makes them bite, where a gradient's error is one of the clamp's step (a pre-activation rounded to
   bf16 lands on the other side of the limit, as in the original bf16 code): printed, not judged.
2. Timing (median ms), forward without grad and forward+backward, eager (triton.testing.do_bench: host time
   included) and replayed in a CUDA graph (do_bench_cudagraph: the GPU's time alone), over --rounds rounds
   with the variants in a rotated order each round (the median per variant: one noisy round or the order
   cannot make a variant look slow):
     swiglu          [E, 2I, H] / [E, H, I], no bias (today's experts, OLMoE's layout): the baseline
     swiglu+bias
     clamped+bias    GPT-OSS's clamped SwiGLU with biases, the same layout
     gpt-oss layout  the same on [E, H, 2I] with gate/up columns interleaved and down [E, I, H] (strided views, as
                     transformers' experts seam passes GPT-OSS's parameters)
   each with its ratio to swiglu: "same speed within 10%" is a ratio at most 1.10.
--smoke runs the whole script on CPU through the Triton interpreter at toy sizes (catches mistakes for free).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_moe  # noqa: E402  (bench_ms: do_bench on CUDA, a timer under --smoke)

from fuser.kernels.moe import expert_arguments  # noqa: E402  (registers torch.ops.fuser.moe_*)
from fuser.numerics.contract import TOLERANCE, numerics_error  # noqa: E402

VARIANTS = ("swiglu", "swiglu+bias", "clamped+bias", "gpt-oss layout")


def inputs(tokens, experts, top_k, hidden, intermediate, device, seed=0):
    """x, ids (distinct experts per token), routing weights, stored weights and biases, all leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.rand(tokens, experts, generator=g).argsort(-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=g) * hidden ** -0.5
    down = torch.randn(experts, hidden, intermediate, generator=g) * intermediate ** -0.5
    gate_up_bias, down_bias = torch.randn(experts, 2 * intermediate, generator=g) * 0.1, \
        torch.randn(experts, hidden, generator=g) * 0.1
    tensors = dict(x=x, weights=weights, gate_up=gate_up, down=down, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return ids.to(device), {k: v.to(device=device, dtype=torch.bfloat16) for k, v in tensors.items()}


def as_stored(variant, t):
    """The leaves as the variant stores them (GPT-OSS: transposed, gate/up columns interleaved)."""
    if variant != "gpt-oss layout":
        return t
    experts, two_i, hidden = t["gate_up"].shape
    order = torch.stack([torch.arange(two_i // 2), torch.arange(two_i // 2) + two_i // 2], 1).flatten()
    return dict(t, gate_up=t["gate_up"][:, order].transpose(1, 2).contiguous(), gate_up_bias=t["gate_up_bias"][:, order],
                down=t["down"].transpose(1, 2).contiguous())


def experts_args(variant, s, limit):
    """`fuser::moe_experts`'s expert arguments for a variant from its stored leaves `s`."""
    if variant == "swiglu":
        return (s["gate_up"], None, s["down"])
    gating = ("silu", 1.0, 0.0) if variant == "swiglu+bias" else ("clamped_swiglu", 1.702, limit)
    gpt_oss = variant == "gpt-oss layout"
    gate_up, down = (s["gate_up"].transpose(1, 2), s["down"].transpose(1, 2)) if gpt_oss else (s["gate_up"], s["down"])
    return expert_arguments(gate_up, down, s["gate_up_bias"], s["down_bias"], gpt_oss, gating)


def leaves_of(variant, s):
    names = ["x", "weights", "gate_up", "down"] + (["gate_up_bias", "down_bias"] if variant != "swiglu" else [])
    return names, [s[n] for n in names]


def run(variant, ids, stored, limit, grad):
    """(out, gradients by leaf name) of the op on leaves copied from `stored`."""
    s = {k: v.detach().clone().requires_grad_() for k, v in stored.items()}
    out = torch.ops.fuser.moe_experts(s["x"], ids, s["weights"], *experts_args(variant, s, limit))
    names, leaves = leaves_of(variant, s)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out, dict(zip(names, grads))


def check(variant, ids, stored, limit, device):
    """Per result, (relative error of the CUDA kernels against the CPU reference, within the bf16 tolerance)."""
    grad = torch.randn(stored["x"].shape, generator=torch.Generator().manual_seed(1)).to(device)
    out, grads = run(variant, ids, stored, limit, grad)
    cpu = {k: v.detach().cpu() for k, v in stored.items()}
    os.environ["TRITON_INTERPRET"] = "0"  # the CPU call takes the plain-torch reference
    ref_out, ref_grads = run(variant, ids.cpu(), cpu, limit, grad.cpu())
    results = {"out": (out, ref_out), **{f"d{k}": (grads[k], ref_grads[k]) for k in grads}}
    return {k: numerics_error(a.cpu(), b) for k, (a, b) in results.items()}


def timings(variant, ids, stored, limit):
    s = {k: v.detach().clone().requires_grad_() for k, v in as_stored(variant, stored).items()}
    args = experts_args(variant, s, limit)
    grad = torch.randn_like(s["x"])

    def forward():
        with torch.no_grad():
            torch.ops.fuser.moe_experts(s["x"], ids, s["weights"], *args)

    def forward_backward():
        out = torch.ops.fuser.moe_experts(s["x"], ids, s["weights"], *args)
        torch.autograd.grad(out, leaves_of(variant, s)[1], grad)
    return (bench_moe.bench_ms(forward), bench_moe.bench_ms(forward_backward), graph_ms(forward),
            graph_ms(forward_backward))


def graph_ms(fn):
    """Median ms of fn replayed in a CUDA graph (nan on the CPU, or where capture fails: printed)."""
    if bench_moe.DEVICE != "cuda":
        return float("nan")
    try:
        import triton.testing
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as error:  # noqa: BLE001
        print(f"  CUDA graph timing failed: {type(error).__name__}: {str(error)[:200]}")
        return float("nan")


def main():
    parser = argparse.ArgumentParser()
    for name, default in (("tokens", 512), ("experts", 64), ("top-k", 8), ("hidden", 2048), ("intermediate", 1024)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    sizes = (24, 4, 2, 32, 24) if a.smoke else (a.tokens, a.experts, a.top_k, a.hidden, a.intermediate)
    device = "cpu" if a.smoke else "cuda"
    bench_moe.DEVICE = device

    ids, stored = inputs(*sizes, device)
    lines, log = [], []
    print(f"tokens {sizes[0]}, {sizes[1]} experts, top-{sizes[2]}, hidden {sizes[3]}, intermediate {sizes[4]}, bf16, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}")
    print(f"{'variant':16} {'limit':>5}  errors against the fp32 reference (bf16 tolerance {TOLERANCE[torch.bfloat16]})")
    failed = False
    for variant in VARIANTS[1:]:
        for limit in (7.0, 0.5) if variant != "swiglu+bias" else (0.0,):
            os.environ["TRITON_INTERPRET"] = "1" if a.smoke else "0"
            errors = check(variant, ids, as_stored(variant, stored), limit, device)
            judged = limit != 0.5
            bad = [k for k, e in errors.items() if e > TOLERANCE[torch.bfloat16] and (judged or k == "out")]
            failed |= bool(bad)
            verdict = "FAIL " + ", ".join(bad) if bad else "ok" if judged else "ok (gradients not judged: clamp steps)"
            print(f"{variant:16} {limit:5}  " + " ".join(f"{k} {e:.1e}" for k, e in errors.items()) + f"  {verdict}")
            log.append(dict(kind="check", variant=variant, limit=limit, errors=errors, ok=not bad))
    os.environ["TRITON_INTERPRET"] = "1" if a.smoke else "0"
    rounds = {variant: [] for variant in VARIANTS}
    for r in range(1 if a.smoke else a.rounds):
        for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            rounds[variant].append(timings(variant, ids, stored, 7.0))
    medians = {v: [sorted(column)[len(column) // 2] for column in zip(*times)] for v, times in rounds.items()}
    base = medians["swiglu"]
    print(f"\n{'variant':16} {'fwd ms':>8} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6}   in a CUDA graph: "
          f"{'fwd ms':>8} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6}")
    for variant in VARIANTS:
        times = medians[variant]
        ratios = [t / b for t, b in zip(times, base)]
        lines.append(f"{variant:16} {times[0]:8.3f} {ratios[0]:6.2f} {times[1]:11.3f} {ratios[1]:6.2f}   "
                     f"{'':16} {times[2]:8.3f} {ratios[2]:6.2f} {times[3]:11.3f} {ratios[3]:6.2f}")
        print(lines[-1])
        log.append(dict(kind="time", variant=variant, forward_ms=times[0], forward_backward_ms=times[1],
                        forward_ratio=ratios[0], forward_backward_ratio=ratios[1], graph_forward_ms=times[2],
                        graph_forward_backward_ms=times[3], graph_forward_ratio=ratios[2],
                        graph_forward_backward_ratio=ratios[3], rounds=rounds[variant]))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_moe_gated.jsonl"), "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in log)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
