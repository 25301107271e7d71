"""End to end on the GPU: a HF Llama with eager (naive) attention compiled with backend="fuser"
against the same model with attn_implementation="sdpa" under default torch.compile (and the
eager-attention model under Inductor), forward and a training step, bf16.

    python benchmarks/bench_llama.py [--layers 4] [--batch 4] [--length 2048]

Also checks, before timing, that every tiny architecture of fuser.models gets its rewrites on
this machine's transformers/torch (pattern counts) and that fuser's logits match the original.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import triton

import fuser
from fuser.models import ARCHITECTURES, tiny_inputs, tiny_model
from fuser.numerics.contract import judge, numerics_error, numerics_problem, tolerance


def check_architectures() -> list[str]:
    """Rewrite counts and logits of every tiny architecture, eager and sdpa attention, bf16 on the GPU,
    against the same model in float32 (left padding: the first sequence's first 5 tokens are hidden).
    The bf16 original's own error sets the floor: at padded positions SDPA's bf16 backends and its
    float32 run disagree (fully masked rows). Not float64: the grouped_mm experts take no float64 on
    CUDA, and eager masks of finfo(float64).min overflow to NaN where two are added."""
    lines = []
    # DeepSeek-V3 last: its distinct q/v head dims are the kernel's rarest case
    for arch in sorted(ARCHITECTURES, key=lambda a: a == "deepseek_v3"):
        for impl in ("eager", "sdpa"):
            model = tiny_model(arch, attn_implementation=impl, dtype=torch.bfloat16).cuda()
            ids = tiny_inputs(model, length=37).cuda()
            mask = torch.ones_like(ids)
            mask[0, :5] = 0
            torch._dynamo.reset()
            fuser.reset_reports()
            errors = ""
            try:
                with torch.no_grad():
                    out = torch.compile(model, backend="fuser", options={"codegen": "eager"})(
                        ids, attention_mask=mask).logits
                    original = model(ids, attention_mask=mask).logits
                    torch.backends.cuda.matmul.allow_tf32 = False
                    ref = copy.deepcopy(model).float()(ids, attention_mask=mask).logits.double()
                verdict = judge(out, ref, own=original)
                problem = verdict.problem
                errors = f"ours {verdict.error:.1e}, bf16 original {numerics_error(original, ref):.1e} from float32"
            except Exception as error:  # report it and go on: the table shows every architecture
                problem = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            lines.append(f"{arch:12s} {impl:5s} {str(fuser.last_report().counts()):55s} "
                         f"{'ok' if problem is None else problem} {errors}")
            print(lines[-1], flush=True)
    return lines


def llama(impl: str, args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, intermediate_size=5632,
                         num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=4096)
    config._attn_implementation = impl
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)


def time_model(model, ids, train: bool) -> float:
    if train:
        model.train()

        def step():
            model(ids, labels=ids).loss.backward()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(ids)
    for _ in range(3):
        step()
    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--runs", choices=["forward", "train", "both"], default="both")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    if not args.skip_check:
        check_architectures()

    ids = torch.randint(0, 32000, (args.batch, args.length), device="cuda")
    eager_attention = llama("eager", args)
    sdpa_attention = llama("sdpa", args)
    sdpa_attention.load_state_dict(eager_attention.state_dict())
    torch._dynamo.reset()
    fuser.reset_reports()
    ours = torch.compile(copy.deepcopy(eager_attention), backend="fuser")
    with torch.no_grad():
        problem = numerics_problem(ours(ids[:1, :256]).logits.float(), eager_attention(ids[:1, :256]).logits.float(),
                                   5 * tolerance(torch.bfloat16))
    print("fuser rewrites:", fuser.last_report().counts(), "logits:", problem or "ok")
    rows = []
    for train in {"forward": (False,), "train": (True,), "both": (False, True)}[args.runs]:
        torch._dynamo.reset()
        times = {
            "fuser (eager attn)": time_model(torch.compile(copy.deepcopy(eager_attention), backend="fuser"), ids, train),
            "inductor (sdpa attn)": time_model(torch.compile(copy.deepcopy(sdpa_attention)), ids, train),
            "inductor (eager attn)": time_model(torch.compile(copy.deepcopy(eager_attention)), ids, train),
        }
        rows.append((("train step" if train else "forward"), times))
        torch.cuda.empty_cache()
    print(f"\nLlama {args.layers} layers, hidden 2048, 32/8 heads, batch {args.batch} x {args.length}, bf16")
    print(f"{'':12s}" + "".join(f"{k:>24s}" for k in rows[0][1]) + f"{'fuser / sdpa':>16s}")
    for name, times in rows:
        ratio = times["fuser (eager attn)"] / times["inductor (sdpa attn)"]
        print(f"{name:12s}" + "".join(f"{v:>21.2f} ms" for v in times.values()) + f"{ratio:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
