"""Greedy decoding with transformers' static cache, compiled the way `generate()` compiles it: backend="fuser" on
the eager-attention model against plain torch.compile (Inductor) on the SDPA model. Issue 12's decode rows.

    python benchmarks/bench_generate.py [--archs llama qwen3] [--layers 4] [--batch 4] [--prompt 512] [--new 128]
                                        [--patterns NAME ...] [--profile]
                                        [--out DIR] [--smoke]

`generate(cache_implementation="static")` compiles the decoding step itself with the model's
`generation_config.compile_config` (transformers' CompileConfig: mode="reduce-overhead", i.e. CUDA graphs, unless
changed); the prefill runs uncompiled. So decode throughput is taken from two runs, `--new` tokens and 1 token:
tokens/s = batch × (new − 1) / (t_new − t_1), each t the median of three timed runs after a warm-up run
(which compiles). bf16, random weights (no hub), vocabulary 32000. Printed last: a table with the ratio
fuser / plain; the share of greedy tokens the two produce alike is printed too (bf16 paths differ, so random
weights can diverge early: informative, not judged).
`--patterns NAME ...` adds a side with only those patterns (what a family costs or gains); `--profile` lists each
side's GPU kernels per decode step (launches and µs, from the profiler), where a ratio needs explaining.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Callable

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig  # noqa: E402

import fuser  # noqa: E402,F401  (registers backend="fuser")
from bench_host import gpu_kernels  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
# hidden 2048, 4 layers: TinyLlama's and Qwen3-1.7B's layer shapes with a 32000-token vocabulary
ARCHS = {"llama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
         "qwen3": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128)}
TOY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def model_of(arch: str, layers: int, attention: str) -> torch.nn.Module:
    sizes = TOY if SMOKE else ARCHS[arch]
    config = AutoConfig.for_model(arch, num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
                                  **sizes)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DEVICE, torch.bfloat16).eval()


def timed_generate(model, ids, new_tokens: int, backend: str) -> tuple[float, torch.Tensor, Callable]:
    """(median seconds of three runs after a warm-up, the tokens, the run)."""
    model.generation_config.compile_config = CompileConfig(backend=backend)  # on CPU (--smoke): compiles nothing

    def run():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                              pad_token_id=0)

    out = run()
    times = []
    for _ in range(1 if SMOKE else 3):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out, run


def decode_step_kernels(run_new, run_one, steps: int) -> dict:
    """{kernel: [launches, GPU us] per decode step}, heaviest first: the profiler's kernels of a run of `steps` + 1
    tokens less those of a 1-token run (the prefill and the first token), over `steps`."""
    _, _, new = gpu_kernels(run_new, 1)
    _, _, one = gpu_kernels(run_one, 1)
    step = {name: [round((n - one.get(name, (0, 0))[0]) / steps, 2), round((us - one.get(name, (0, 0))[1]) / steps, 2)]
            for name, (n, us) in new.items()}
    return dict(sorted(((k, v) for k, v in step.items() if v[0] > 0), key=lambda i: -i[1][1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--patterns", nargs="+", help="also a side 'fuser[patterns]': backend fuser with only "
                        "these patterns (what a rewrite family costs or gains in decode)")
    parser.add_argument("--profile", action="store_true", help="also each side's GPU kernels per decode step "
                        "(profiler; the log and generate_kernels.json)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    args = parser.parse_args()
    sides = [("plain", "sdpa", "inductor"), ("fuser", "eager", "fuser")]
    if args.patterns:
        restricted = f"fuser[{','.join(args.patterns)}]"
        torch._dynamo.register_backend(functools.partial(fuser.fuser_backend, options={"patterns": args.patterns}),
                                       name=restricted)
        sides.append((restricted, "eager", restricted))
    batch, prompt, new = (1, 8, 3) if SMOKE else (args.batch, args.prompt, args.new)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    lines = [f"{device}, torch {torch.__version__}, bf16, static cache, B{batch} prompt {prompt}, {new} new tokens",
             "| model | side | t(new) s | t(1) s | decode tok/s | fuser / plain | same tokens | rewrites |",
             "|---|---|---|---|---|---|---|---|"]
    kernels = {}
    for arch in args.archs:
        ids = torch.randint(1, 32000, (batch, prompt), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
        results = {}
        for side, attention, backend in sides:
            torch._dynamo.reset()
            fuser.reset_reports()
            model = model_of(arch, args.layers, attention)
            started = time.perf_counter()
            t_new, tokens, run_new = timed_generate(model, ids, new, backend)
            t_one, _, run_one = timed_generate(model, ids, 1, backend)
            if args.profile and DEVICE == "cuda":
                kernels[f"{arch} {side}"] = per_step = decode_step_kernels(run_new, run_one, new - 1)
                print(f"{arch} {side}: {sum(n for n, _ in per_step.values()):.0f} kernels, "
                      f"{sum(us for _, us in per_step.values()):.1f} GPU us a decode step; heaviest: "
                      f"{json.dumps(dict(list(per_step.items())[:15]))}", flush=True)
            counts = fuser.last_report().counts() if backend.startswith("fuser") else {}
            results[side] = (t_new, t_one, batch * (new - 1) / max(t_new - t_one, 1e-9), tokens[:, prompt:], counts)
            print(f"{arch} {side}: {time.perf_counter() - started:.0f} s with compiling", flush=True)
            del model
        for side, (t_new, t_one, rate, tokens, counts) in results.items():
            same = (results["plain"][3] == tokens).float().mean().item()
            ratio = rate / results["plain"][2]
            lines.append(f"| {arch} {args.layers} layers | {side} | {t_new:.3f} | {t_one:.3f} | {rate:.0f} | "
                         f"{ratio:.2f} | {same:.0%} | {counts or ''} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "generate.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        if kernels:
            with open(os.path.join(args.out, "generate_kernels.json"), "w") as f:
                json.dump(kernels, f, indent=1)


if __name__ == "__main__":
    main()
