"""Absorbed MLA decode on the GPU: a DeepSeek-V3-shaped attention layer's decode step, ours against transformers'.

    python benchmarks/bench_mla.py [--out DIR] [--sweep] [--contexts 4096 16384 65536] [--batches 1 8 32]

DeepSeek-V3's attention (hidden 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128, v 128),
bf16, random weights, one new token over a context of L cached tokens:
1. Checks against float64: `fuser::mla_decode` at V3's head shapes (1 and 3 new tokens, contexts off any
   block) against its reference, and the layer's decode step in the latent space (`LatentDecode`) against the
   layer's own forward run in float64.
2. For L in 4k, 16k, 64k × batch 1, 8, 32 (do_bench medians, ms): the whole attention step from hidden states
   — transformers' own forward (SDPA, which expands the whole cached latent through kv_b_proj every step) in
   eager and under plain torch.compile, against ours (`LatentDecode`: W_UK / W_UV absorbed, `fuser::mla_decode`
   over the latent), and transformers' own forward under torch.compile(backend="fuser") (the graph pattern
   `patterns/latent_attention.py` rewrites its expansion + SDPA into the absorbed op; the rewrite count is
   printed) — and the kernel alone, its read of the latent cache in TB/s against `copy_` of a tensor
   of the cache's size measured in the same run (read + write bytes over time). Both steps run through one
   cache whose `update` writes the new token in place (no growth, no torch.cat: the step's own work only).
   A case transformers' expansion cannot fit in free memory is shown as "oom".
3. --sweep: the kernel's tilings (rows, keys, warps, stages, splits) around the default, the best shown.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib

import torch
import triton
from transformers import DeepseekV3Config, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

import fuser  # registers torch.ops.fuser.* and the "fuser" backend
from fuser.integrations.latent_attention import LatentDecode
from fuser.kernels.mla_decode import DecodeTiling, decode_tiling, mla_decode_launch, mla_decode_reference
from fuser.kernels.runtime import program_slots
from fuser.numerics.contract import numerics_error, tolerance

DEVICE, DTYPE = "cuda", torch.bfloat16
V3 = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
          qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
          rope_interleave=True, attention_bias=False)
LINES: list[str] = []


def log(*parts):
    line = " ".join(str(p) for p in parts)
    LINES.append(line)
    print(line, flush=True)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def bench_compiled(fn) -> float | str:
    """do_bench of a torch.compile'd step, or what went wrong (the table keeps the other columns)."""
    try:
        return bench(fn)
    except Exception as error:  # a compiler failure is a result of this benchmark, not the end of it
        log(f"  torch.compile failed: {type(error).__name__}: {str(error)[:300]}")
        return "error"


class InPlaceCache(DynamicCache):
    """A dynamic cache of `context` random latent tokens per layer whose `update` writes the step's token into
    the last position in place and returns the whole cache (transformers' DynamicLayer, without its growth)."""

    def __init__(self, config, batch: int, context: int, generator: torch.Generator):
        super().__init__(config=config)
        if not self.layers:  # a transformers that makes its layers on first update
            self.layers.append(DynamicLayer())
        layer = self.layers[0]
        layer.keys = torch.randn(batch, 1, context, config.kv_lora_rank, generator=generator, device=DEVICE).to(DTYPE)
        layer.values = torch.randn(batch, 1, context, config.qk_rope_head_dim, generator=generator,
                                   device=DEVICE).to(DTYPE)
        layer.dtype, layer.device, layer.is_initialized = DTYPE, layer.keys.device, True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.keys[:, :, -1:].copy_(key_states)
        layer.values[:, :, -1:].copy_(value_states)
        return layer.keys, layer.values


def v3_layer(attn_implementation: str = "sdpa"):
    config = DeepseekV3Config(**V3, num_hidden_layers=1)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    layer = DeepseekV3Attention(config, 0).to(DEVICE, DTYPE).eval()
    for module in layer.modules():  # transformers' init leaves Linear weights as torch draws them: fine
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    return layer, DeepseekV3RotaryEmbedding(config).to(DEVICE)


def step_inputs(layer, rotary, batch: int, context: int, seed: int = 0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(batch, 1, layer.config.hidden_size, generator=generator, device=DEVICE).to(DTYPE)
    cos, sin = rotary(hidden, torch.full((batch, 1), context - 1, device=DEVICE))
    return (hidden, (cos, sin), None), InPlaceCache(layer.config, batch, context, generator)


def kernel_inputs(config, batch, new_tokens, context, seed=0):
    """(q_lat, q_pe, c, k_pe, scale) at the config's head shapes."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    heads, latent, rope = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE).to(DTYPE)
    return (randn(batch, new_tokens, heads, latent), randn(batch, new_tokens, heads, rope),
            randn(batch, context, latent), randn(batch, context, rope), (config.qk_nope_head_dim + rope) ** -0.5)


def checks(layer, rotary) -> bool:
    log("checks against float64:")
    results = []
    for batch, new_tokens, context in ((2, 1, 1000), (1, 3, 4099), (4, 1, 33)):
        args = kernel_inputs(layer.config, batch, new_tokens, context)
        out = torch.ops.fuser.mla_decode(*args)
        error = numerics_error(out, mla_decode_reference(*(a.double() if torch.is_tensor(a) else a for a in args)))
        results.append(error <= tolerance(DTYPE))
        log(f"  {'ok  ' if results[-1] else 'FAIL'} mla_decode B{batch} new {new_tokens} L{context}: {error:.2e}")
    step, cache = step_inputs(layer, rotary, 1, 4096)
    with torch.no_grad():
        ours = LatentDecode(layer)(layer, step, {"cache": cache})[0]
        cache64 = InPlaceCache(layer.config, 1, 1, torch.Generator(device=DEVICE))
        cache64.layers[0].keys, cache64.layers[0].values = (t.double() for t in (cache.layers[0].keys,
                                                                                 cache.layers[0].values))
        layer64 = DeepseekV3Attention(layer.config, 0).to(DEVICE, torch.float64).eval()
        layer64.load_state_dict(layer.state_dict())
        step64 = (step[0].double(), tuple(t.double() for t in step[1]), None)
        name = LatentDecode(layer).cache_name  # 5.24 calls it cache, earlier versions past_key_values
        reference = layer64(*step64, **{name: cache64})[0]
        own = layer(*step, **{name: cache})[0]
    error, own_error = numerics_error(ours, reference), numerics_error(own, reference)
    results.append(error <= max(tolerance(DTYPE), 2 * own_error))
    log(f"  {'ok  ' if results[-1] else 'FAIL'} layer decode step B1 L4096: ours {error:.2e}, transformers' own "
        f"bf16 {own_error:.2e}")
    del layer64
    torch.cuda.empty_cache()
    return all(results)


def expansion_bytes(config, batch: int, context: int) -> int:
    """What transformers' step allocates, twice over for SDPA's and the compiler's copies: kv_b_proj's output, the
    keys built from it, the values."""
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    return 2 * batch * context * config.num_attention_heads * ((nope + v) + (nope + rope) + v) * 2


def kernel_row(config, batch, context, sweep: bool) -> dict:
    q_lat, q_pe, c, k_pe, scale = kernel_inputs(config, batch, 1, context)
    heads, latent, rope = q_lat.shape[2], c.shape[2], k_pe.shape[2]
    t_kernel = bench(lambda: torch.ops.fuser.mla_decode(q_lat, q_pe, c, k_pe, scale))
    source = torch.cat([c, k_pe], -1)
    target = torch.empty_like(source)
    t_copy = bench(lambda: target.copy_(source))
    read = (c.numel() + k_pe.numel()) * c.element_size() + 2 * q_lat.numel() * q_lat.element_size()
    row = dict(kernel_ms=t_kernel, kernel_tbps=read / t_kernel / 1e9,
               copy_tbps=2 * source.numel() * source.element_size() / t_copy / 1e9)
    row["default_tiling"] = decode_tiling(batch, heads, context, latent, rope, 2, program_slots(c.device)).__dict__
    if sweep:
        timed = []
        for t in tilings(row["default_tiling"]["splits"], context, latent):
            try:
                timed.append((bench(lambda t=t: mla_decode_launch(q_lat, q_pe, c, k_pe, scale, t)), t))
            except triton.runtime.errors.OutOfResources:  # more shared memory than the GPU has: not a candidate
                continue
        best = min(timed, key=lambda x: x[0])
        row.update(sweep_ms=best[0], sweep_tbps=read / best[0] / 1e9, sweep_tiling=best[1].__dict__)
    return row


def tilings(default_splits: int, context: int, latent: int):
    for m, n, warps, stages in itertools.product((32, 64), (16, 32, 64), (4, 8), (1, 2, 3)):
        if m * latent / (32 * warps) > 192:  # float32 accumulator values per thread
            continue
        for splits in sorted({max(1, default_splits // 2), default_splits, default_splits * 2}):
            if splits <= math.ceil(context / n):
                yield DecodeTiling(m, n, warps, stages, splits)


def step_row(layer, rotary, compiled_theirs, compiled_ours, compiled_fuser, batch, context) -> dict:
    step, cache = step_inputs(layer, rotary, batch, context)
    call = LatentDecode(layer)
    forward, name = DeepseekV3Attention.forward, call.cache_name
    row = {}
    with torch.no_grad():
        row["ours_ms"] = bench(lambda: call(layer, step, {"cache": cache}))
        row["ours_compiled_ms"] = bench_compiled(lambda: compiled_ours(step, cache))
        row["fuser_compiled_ms"] = bench_compiled(lambda: compiled_fuser(step, cache))
        free, _ = torch.cuda.mem_get_info()
        if expansion_bytes(layer.config, batch, context) > 0.8 * free:
            row["eager_ms"] = row["compiled_ms"] = "oom"
        else:
            row["eager_ms"] = bench(lambda: forward(layer, *step, **{name: cache}))
            row["compiled_ms"] = bench_compiled(lambda: compiled_theirs(step, cache))
    torch.cuda.empty_cache()
    return row


def fmt(value) -> str:
    return value if isinstance(value, str) else f"{value:.3f}"


def ratio(theirs, ours) -> str:
    return "-" if isinstance(theirs, str) else f"{theirs / ours:.1f}x"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, help="write the log and a JSON of the rows here")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's tilings")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    options = parser.parse_args()
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    layer, rotary = v3_layer()
    passed = checks(layer, rotary)
    call = LatentDecode(layer)
    compiled_theirs = torch.compile(lambda step, cache: DeepseekV3Attention.forward(layer, *step,
                                                                                    **{call.cache_name: cache}))
    compiled_ours = torch.compile(lambda step, cache: call(layer, step, {"cache": cache}))
    compiled_fuser = torch.compile(lambda step, cache: DeepseekV3Attention.forward(layer, *step,
                                                                                   **{call.cache_name: cache}),
                                   backend="fuser")
    rows = []
    for context, batch in itertools.product(options.contexts, options.batches):
        row = dict(context=context, batch=batch, **kernel_row(layer.config, batch, context, options.sweep),
                   **step_row(layer, rotary, compiled_theirs, compiled_ours, compiled_fuser, batch, context))
        rows.append(row)
        log(f"  L{context} B{batch}: {row}")
    log("\n| context | batch | ours ms | ours compiled ms | transformers eager ms | speedup | transformers compiled ms "
        "| speedup | transformers under backend=fuser ms | kernel ms | kernel TB/s | copy TB/s | % of copy |"
        + (" swept TB/s | swept tiling |" if options.sweep else ""))
    log("|---" * (13 + 2 * options.sweep) + "|")
    for r in rows:
        line = (f"| {r['context']} | {r['batch']} | {r['ours_ms']:.3f} | {fmt(r['ours_compiled_ms'])} | "
                f"{fmt(r['eager_ms'])} | {ratio(r['eager_ms'], r['ours_ms'])} | {fmt(r['compiled_ms'])} | "
                f"{ratio(r['compiled_ms'], r['ours_ms'])} | {fmt(r['fuser_compiled_ms'])} | "
                f"{r['kernel_ms']:.4f} | {r['kernel_tbps']:.2f} | "
                f"{r['copy_tbps']:.2f} | {100 * r['kernel_tbps'] / r['copy_tbps']:.0f}% |")
        if options.sweep:
            t = r["sweep_tiling"]
            line += (f" {r['sweep_tbps']:.2f} | {t['block_m']}x{t['block_n']} w{t['num_warps']} s{t['num_stages']} "
                     f"splits {t['splits']} |")
        log(line)
    report = fuser.last_report()
    log(f"backend=fuser over every compilation: {report.counts()}; latent_attention near misses: "
        f"{[n.reason for n in report.near_misses if n.pattern == 'latent_attention']}")
    log(f"checks: {'all passed' if passed else 'FAILURES above'}")
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "bench_mla.log").write_text("\n".join(LINES) + "\n")
        (options.out / "bench_mla.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
