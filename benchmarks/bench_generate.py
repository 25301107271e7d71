"""Greedy decoding with transformers' static cache, compiled the way `generate()` compiles it: backend="fuser" on
the eager-attention model against plain torch.compile (Inductor) on the SDPA model. Issue 12's decode rows.

    python benchmarks/bench_generate.py [--archs llama qwen3] [--layers 4] [--batch 4] [--prompt 512] [--new 128]
                                        [--patterns NAME ...]
                                        [--out DIR] [--smoke]

`generate(cache_implementation="static")` compiles the decoding step itself with the model's
`generation_config.compile_config` (transformers' CompileConfig: mode="reduce-overhead", i.e. CUDA graphs, unless
changed); the prefill runs uncompiled. So decode throughput is taken from two runs, `--new` tokens and 1 token:
tokens/s = batch × (new − 1) / (t_new − t_1), each t the median of three timed runs after a warm-up run
(which compiles). bf16, random weights (no hub), vocabulary 32000. Printed last: a table with the ratio
fuser / plain; the share of greedy tokens the two produce alike is printed too (bf16 paths differ, so random
weights can diverge early: informative, not judged).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig  # noqa: E402

import fuser  # noqa: E402,F401  (registers backend="fuser")

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


def timed_generate(model, ids, new_tokens: int, backend: str) -> tuple[float, torch.Tensor]:
    """(median seconds of three runs after a warm-up, the tokens)."""
    model.generation_config.compile_config = CompileConfig(backend=backend)  # on CPU (--smoke) generate compiles nothing

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
    return statistics.median(times), out


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
    for arch in args.archs:
        ids = torch.randint(1, 32000, (batch, prompt), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
        results = {}
        for side, attention, backend in sides:
            torch._dynamo.reset()
            fuser.reset_reports()
            model = model_of(arch, args.layers, attention)
            started = time.perf_counter()
            t_new, tokens = timed_generate(model, ids, new, backend)
            t_one, _ = timed_generate(model, ids, 1, backend)
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


if __name__ == "__main__":
    main()
