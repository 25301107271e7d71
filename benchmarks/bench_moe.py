"""fuser's MoE kernels against transformers' own MoE blocks, bf16, one GPU, one run.

    python benchmarks/bench_moe.py [--configs olmoe-512 olmoe-4096 mixtral-4096] [--out DIR]

First a correctness check (bf16 against float64, forward and every gradient), then per config:
ours (router linear + fuser::moe_route + fuser::moe_experts, eager) against the transformers block
(OlmoeSparseMoeBlock / MixtralSparseMoeBlock) with `config._experts_implementation` = "grouped_mm"
under torch.compile (Inductor), the same uncompiled, and the eager per-expert loop; forward
(no grad) and forward+backward (grads of x and every parameter). Then each of our kernels alone,
torch's grouped GEMM (`torch._grouped_mm`, CUTLASS) on the same sorted rows, and a bf16 matmul
rate measured in the same run. The short table comes last; JSON lines go to --out.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from fuser.kernels import moe  # noqa: F401  (registers torch.ops.fuser.moe_*)
from fuser.kernels.moe import gemm
from fuser.kernels.moe.experts import _plan_layout
from fuser.kernels.moe.over_topk import over_topk
from fuser.kernels.moe.plan import PlanLayout, build_plan

CONFIGS = {
    "olmoe-512": dict(family="olmoe", tokens=512, experts=64, top_k=8, hidden=2048, intermediate=1024),
    "olmoe-4096": dict(family="olmoe", tokens=4096, experts=64, top_k=8, hidden=2048, intermediate=1024),
    "mixtral-4096": dict(family="mixtral", tokens=4096, experts=8, top_k=2, hidden=4096, intermediate=14336),
}
# --smoke: the whole script on CPU through the Triton interpreter, at toy sizes, to catch mistakes for free
SMOKE_CONFIGS = {"toy": dict(family="olmoe", tokens=24, experts=4, top_k=2, hidden=32, intermediate=24)}
DEVICE = "cuda"


def bench_ms(fn):
    if DEVICE == "cpu":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def matmul_tflops(size=8192):
    size = size if DEVICE == "cuda" else 256
    a, b = (torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size ** 3 / bench_ms(lambda: a @ b) * 1e-9


def hf_block(cfg, implementation, dtype=torch.bfloat16):
    """A transformers MoE block from a config, weights drawn so that routing spreads over the experts."""
    if cfg["family"] == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        config = OlmoeConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                             num_experts=cfg["experts"], num_experts_per_tok=cfg["top_k"])
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        config = MixtralConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                               num_local_experts=cfg["experts"], num_experts_per_tok=cfg["top_k"])
    config._experts_implementation = implementation
    block = Block(config)
    torch.nn.init.normal_(block.gate.weight, std=cfg["hidden"] ** -0.5)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(block.experts.down_proj, std=0.02)
    return block.to(DEVICE, dtype)


def routing_of(cfg):
    """(renormalize, weights dtype) of the transformers router: OLMoE casts to the logits dtype, Mixtral keeps fp32."""
    return (False, None) if cfg["family"] == "olmoe" else (True, torch.float32)


def ours(block, cfg):
    """The same block through the fuser ops, reading the block's parameters in place."""
    renormalize, weights_dtype = routing_of(cfg)

    def forward(x):
        flat = x.view(-1, x.shape[-1])
        logits = F.linear(flat, block.gate.weight)
        weights, ids = torch.ops.fuser.moe_route(logits, cfg["top_k"], "softmax", renormalize, None, 1.0,
                                                 weights_dtype or logits.dtype)
        out = torch.ops.fuser.moe_experts(flat, ids, weights, block.experts.gate_up_proj, None,
                                          block.experts.down_proj)
        return out.view(x.shape)
    return forward


def params_of(block):
    return [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]


# --- correctness ---------------------------------------------------------------------------------

def experts_float64(x, ids, weights, gate_up, down):
    """transformers' eager expert loop in float64, differentiable."""
    intermediate = down.shape[2]
    out = torch.zeros_like(x)
    for expert in range(gate_up.shape[0]):
        token, slot = torch.where(ids == expert)
        h = F.silu(x[token] @ gate_up[expert, :intermediate].T) * (x[token] @ gate_up[expert, intermediate:].T)
        out = out.index_add(0, token, (h @ down[expert].T) * weights[token, slot, None])
    return out


def rel_l2(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(cfg, label):
    """Each op in bf16 against float64 on the same inputs (the router's logits, then its ids and weights):
    {name: relative L2} of the values and every gradient."""
    torch.manual_seed(0)
    tokens, hidden, top_k = cfg["tokens"], cfg["hidden"], cfg["top_k"]
    block = hf_block(cfg, "eager")
    renormalize, weights_dtype = routing_of(cfg)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    logits = F.linear(x, block.gate.weight).detach().requires_grad_()
    weights, ids = torch.ops.fuser.moe_route(logits, top_k, "softmax", renormalize, None, 1.0,
                                             weights_dtype or logits.dtype)
    logits64 = logits.detach().double().requires_grad_()
    weights64 = logits64.softmax(-1).gather(1, ids)
    if renormalize:
        weights64 = weights64 / weights64.sum(-1, keepdim=True)
    grad_weights = torch.randn_like(weights64)
    errors = {"route": rel_l2(weights, weights64),
              "route d_logits": rel_l2(*(torch.autograd.grad(w, l, grad_weights.to(w.dtype))[0]
                                         for w, l in [(weights, logits), (weights64, logits64)]))}
    leaves = [x.requires_grad_(), weights.detach().requires_grad_(), block.experts.gate_up_proj,
              block.experts.down_proj]
    out = torch.ops.fuser.moe_experts(leaves[0], ids, leaves[1], leaves[2], None, leaves[3])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = experts_float64(leaves64[0], ids, *leaves64[1:])
    grad = torch.randn_like(expected)
    errors["experts"] = rel_l2(out, expected)
    for name, ours_grad, ref_grad in zip(["dx", "d_weights", "d_gate_up", "d_down"],
                                         torch.autograd.grad(out, leaves, grad.to(out.dtype)),
                                         torch.autograd.grad(expected, leaves64, grad)):
        errors["experts " + name] = rel_l2(ours_grad, ref_grad)
    print(f"check {label}: " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    return errors


# --- timings -------------------------------------------------------------------------------------

def block_timings(cfg):
    """ms of forward (no grad) and forward+backward for ours and each transformers peer."""
    torch.manual_seed(0)
    results = {}
    x = torch.randn(1, cfg["tokens"], cfg["hidden"], device=DEVICE, dtype=torch.bfloat16)
    x_grad = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    block = hf_block(cfg, "eager")
    params = params_of(block)

    def measure(name, forward):
        def forward_backward():
            torch.autograd.grad(forward(x_grad), [x_grad, *params], grad)
        for phase, run, grad_mode in [("fwd", lambda: forward(x), torch.no_grad), ("fwd+bwd", forward_backward,
                                                                                    torch.enable_grad)]:
            try:  # a peer that fails on this torch / transformers is reported, not fatal
                with grad_mode():
                    run()
                    results[(name, phase)] = bench_ms(run)
            except Exception as error:  # noqa: BLE001
                print(f"  {name} {phase} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                results[(name, phase)] = float("nan")
        print(f"  {name}: fwd {results[(name, 'fwd')]:.3f} ms, fwd+bwd {results[(name, 'fwd+bwd')]:.3f} ms",
              flush=True)

    measure("ours", ours(block, cfg))
    graphed(results, "ours_graph", ours(block, cfg), x, x_grad, params, grad)
    measure("hf_loop", block)
    block.experts.config._experts_implementation = "grouped_mm"
    measure("hf_grouped_eager", block)
    started = time.time()
    torch._dynamo.reset()
    measure("hf_compiled", torch.compile(block))
    print(f"  (compiling the transformers block took {time.time() - started:.0f} s)", flush=True)
    if DEVICE == "cuda":  # the same with CUDA graphs, to set against ours in one graph
        torch._dynamo.reset()
        measure("hf_compiled_graph", torch.compile(block, mode="reduce-overhead"))
    return results


def graphed(results, name, forward, x, x_grad, params, grad):
    """The same forward / forward+backward captured in one CUDA graph and replayed: the GPU time alone,
    without the host's launch overhead (and a check that nothing in it syncs the host)."""
    if DEVICE != "cuda":
        return
    for phase, grad_mode, run in [
            ("fwd", torch.no_grad, lambda: forward(x)),
            ("fwd+bwd", torch.enable_grad, lambda: torch.autograd.grad(forward(x_grad), [x_grad, *params], grad))]:
        try:
            with grad_mode():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
            results[(name, phase)] = bench_ms(graph.replay)
        except Exception as error:  # noqa: BLE001
            print(f"  {name} {phase} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            results[(name, phase)] = float("nan")
    print(f"  {name}: fwd {results[(name, 'fwd')]:.3f} ms, fwd+bwd {results[(name, 'fwd+bwd')]:.3f} ms", flush=True)


def profile_ours(cfg, out_dir, label):
    """torch.profiler over a few forward+backward steps of ours: where host and GPU time go."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    block = hf_block(cfg, "eager")
    forward, params = ours(block, cfg), params_of(block)
    x = torch.randn(1, cfg["tokens"], cfg["hidden"], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    step = lambda: torch.autograd.grad(forward(x), [x, *params], grad)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3 / 5
    averages = prof.key_averages()
    by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    by_gpu = averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60)
    with open(os.path.join(out_dir, f"profile_{label}.txt"), "w") as f:
        f.write(by_cpu + "\n\n" + by_gpu)
    gpu_ms = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"  profile {label}: wall {wall_ms:.3f} ms / step, GPU kernels {gpu_ms / 5e3:.3f} ms / step", flush=True)
    print("\n".join(by_cpu.splitlines()[:18]), flush=True)


def host_costs(cfg, calls=200):
    """Host time per call (us) of each entry point at a tiny token count, where the GPU waits on the host."""
    torch.manual_seed(0)
    block = hf_block(cfg, "eager")
    x = torch.randn(8, cfg["hidden"], device=DEVICE, dtype=torch.bfloat16)
    logits = F.linear(x, block.gate.weight.detach())
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    weights, ids = torch.ops.fuser.moe_route(logits, cfg["top_k"], "softmax", False, None, 1.0, x.dtype)
    layout = _plan_layout(8, cfg["top_k"], cfg["experts"])
    plan = build_plan(ids, cfg["experts"], layout.block_m)
    inter = cfg["intermediate"]
    h = x.new_empty(layout.rows, inter)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    entries = {
        "moe_route": lambda: torch.ops.fuser.moe_route(logits, cfg["top_k"], "softmax", False, None, 1.0, x.dtype),
        "moe_experts": lambda: torch.ops.fuser.moe_experts(x, ids, weights, gate_up, None, down),
        "build_plan": lambda: build_plan(ids, cfg["experts"], layout.block_m),
        "one gemm launch": lambda: gemm.expert_rows_gemm(
            gemm.GATE_UP, plan, layout, x, gate, (gate.stride(0), 1, gate.stride(1)), h, inter, cfg["hidden"],
            cfg["top_k"], b2=up, b2_strides=(up.stride(0), 1, up.stride(1)), routing_weights=weights.view(-1)),
        "torch.empty": lambda: torch.empty(8, 8, device=DEVICE),
    }
    costs = {}
    with torch.no_grad():
        for name, entry in entries.items():
            entry()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(calls):
                entry()
            costs[name] = (time.perf_counter() - started) / calls * 1e6
            torch.cuda.synchronize()
    print("  host us/call: " + "  ".join(f"{k} {v:.0f}" for k, v in costs.items()), flush=True)
    return costs


def kernel_timings(cfg, block_m=None):
    """ms of each of our launches alone, and of torch._grouped_mm on the same sorted rows
    (block_m: a tile height other than block_m_for's, to compare)."""
    torch.manual_seed(0)
    tokens, experts, top_k, hidden, inter = (cfg[k] for k in ("tokens", "experts", "top_k", "hidden", "intermediate"))
    block = hf_block(cfg, "eager")
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    logits = F.linear(x, block.gate.weight.detach())
    renormalize, weights_dtype = routing_of(cfg)
    route = lambda: torch.ops.fuser.moe_route(logits, top_k, "softmax", renormalize, None, 1.0,  # noqa: E731
                                              weights_dtype or x.dtype)
    weights, ids = route()
    layout = _plan_layout(tokens, top_k, experts)
    if block_m is not None:
        layout = PlanLayout(layout.rows, experts, block_m)
    plan = build_plan(ids, experts, layout.block_m)
    rows = layout.rows
    h = x.new_empty(rows, inter)
    act = x.new_empty(rows, 2 * inter)
    contributions = x.new_empty(rows, hidden)
    out = x.new_empty(tokens, hidden)
    flat_weights = weights.contiguous().view(-1)
    grad_out = torch.randn_like(x)
    grad_act = x.new_empty(rows, 2 * inter)
    partials = torch.empty(rows, triton.cdiv(inter, gemm.PARTIAL_GRAIN.value), device=DEVICE)
    d_gate_up, d_down = torch.empty_like(gate_up), torch.empty_like(down)
    transposed = lambda w: (w.stride(0), w.stride(2), w.stride(1))  # noqa: E731
    launches = {
        "route": route,
        "plan": lambda: build_plan(ids, experts, layout.block_m),
        "gate_up": lambda: gemm.expert_rows_gemm(gemm.GATE_UP, plan, layout, x, gate, transposed(gate), h, inter,
                                                 hidden, top_k, b2=up, b2_strides=transposed(up),
                                                 routing_weights=flat_weights),
        "gate_up+save": lambda: gemm.expert_rows_gemm(gemm.GATE_UP, plan, layout, x, gate, transposed(gate), h,
                                                      inter, hidden, top_k, b2=up, b2_strides=transposed(up),
                                                      act=act, routing_weights=flat_weights, extra_output=True),
        "down": lambda: gemm.expert_rows_gemm(gemm.DOWN, plan, layout, h, down, transposed(down), contributions,
                                              hidden, inter, top_k),
        "sum_topk": lambda: over_topk(ids, experts, contributions, out),
        "grad_h": lambda: gemm.expert_rows_gemm(gemm.GRAD_H, plan, layout, grad_out, down, down.stride(), grad_act,
                                                inter, hidden, top_k, act=act, routing_weights=flat_weights,
                                                partials=partials, extra_output=True),
        "grad_x": lambda: gemm.expert_rows_gemm(gemm.GRAD_X, plan, layout, grad_act, gate, gate.stride(),
                                                contributions, hidden, inter, top_k, b2=up, b2_strides=up.stride()),
        "sum_topk+d_weights": lambda: over_topk(ids, experts, contributions, out, partials=partials,
                                                d_weights=flat_weights.new_empty(rows)),
        "dW_gate_up+dW_down": lambda: gemm.expert_weight_grads(plan, layout, grad_act, x, d_gate_up, grad_out, h,
                                                               d_down, top_k),
    }
    # calibration: the DOWN kernel as one dense 8192^3 GEMM (one expert, every row), against the matmul rate
    dense = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) if DEVICE == "cuda" and not block_m else None
    if dense is not None:
        dense_ids = torch.zeros(8192, 1, dtype=torch.int64, device=DEVICE)
        dense_layout = _plan_layout(8192, 1, 1)
        dense_plan = build_plan(dense_ids, 1, dense_layout.block_m)
        dense_weight = dense.view(1, 8192, 8192)
        dense_out = torch.empty_like(dense)
        launches["dense_8192_as_down"] = lambda: gemm.expert_rows_gemm(
            gemm.DOWN, dense_plan, dense_layout, dense, dense_weight, dense_weight.stride(), dense_out, 8192, 8192, 1)
    times = {}
    for name, launch in launches.items():
        launch()
        times[name] = bench_ms(launch)
    # torch's CUTLASS grouped GEMM on the same rows, already sorted (what grouped_mm reaches at best)
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    sorted_rows, expert_offsets = layout.split(plan)[:2]
    x_sorted = x[sorted_rows.long() // top_k]
    offsets = expert_offsets[1:].to(torch.int32)
    for name, a, b in [("gate_up", x_sorted, gate_up), ("down", h, down)]:
        try:
            times["torch_grouped_mm_" + name] = bench_ms(lambda: grouped_mm(a, b.transpose(1, 2), offs=offsets))
        except Exception as error:  # noqa: BLE001
            print(f"  torch grouped_mm failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
            times["torch_grouped_mm_" + name] = float("nan")
    return times


def autotune_choices():
    """The config each autotuned kernel picked, per autotuning key."""
    return {f"{kernel.base_fn.__name__} {key}": str(config)
            for kernel in (gemm._expert_rows_gemm_kernel, gemm._expert_weight_grads_kernel)
            for key, config in kernel.cache.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, toy sizes")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        CONFIGS.update(SMOKE_CONFIGS)
        args.configs = list(SMOKE_CONFIGS)
    import transformers
    env = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__)
    print(env, flush=True)
    log = open(os.path.join(args.out, "bench_moe.jsonl"), "a")

    def record(**entry):
        log.write(json.dumps({**env, **entry}) + "\n")
        log.flush()

    if not args.skip_check:
        small = dict(family="mixtral", tokens=300, experts=16, top_k=4, hidden=512, intermediate=320)
        checks = [("small-mixtral-like", small), ("olmoe-512", CONFIGS["olmoe-512"])]
        for label, cfg in (list(SMOKE_CONFIGS.items()) if args.smoke else checks):
            record(kind="check", config=label, errors=check(cfg, label))
    rate = matmul_tflops()
    print(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s", flush=True)
    record(kind="matmul", tflops=rate)

    table = []
    for name in args.configs:
        cfg = CONFIGS[name]
        print(f"== {name} {cfg}", flush=True)
        started = time.time()
        kernels = kernel_timings(cfg)
        print("  kernels (ms): " + "  ".join(f"{k} {v:.3f}" for k, v in kernels.items()), flush=True)
        print(f"  (first calls incl. autotuning took {time.time() - started:.0f} s)", flush=True)
        record(kind="kernels", config=name, ms=kernels, autotune=autotune_choices())
        if name == "olmoe-4096" and DEVICE == "cuda":  # would 64-row tiles (half the padding) pay here?
            alternative = kernel_timings(cfg, block_m=64)
            print("  with BLOCK_M 64 (ms): " + "  ".join(
                f"{k} {alternative[k]:.3f}" for k in ("gate_up", "down", "grad_h", "grad_x")), flush=True)
            record(kind="kernels_block_m_64", config=name, ms=alternative)
        if DEVICE == "cuda" and name == "olmoe-512":
            try:
                record(kind="host", config=name, us=host_costs(cfg))
                profile_ours(cfg, args.out, name)
            except Exception as error:  # noqa: BLE001
                print(f"  profile failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        blocks = block_timings(cfg)
        record(kind="blocks", config=name, ms={f"{k[0]} {k[1]}": v for k, v in blocks.items()})
        flops = 6 * cfg["tokens"] * cfg["top_k"] * cfg["hidden"] * cfg["intermediate"]  # forward expert GEMMs
        gemm_ms = kernels["gate_up"] + kernels["down"]
        cutlass_ms = kernels["torch_grouped_mm_gate_up"] + kernels["torch_grouped_mm_down"]
        table.append((name, blocks, flops / gemm_ms * 1e-9, flops / cutlass_ms * 1e-9))

    print(f"\n{env}\nbf16 matmul rate {rate:.0f} TFLOP/s; times in ms (median); ratio = peer / ours")
    print("ours / compiled: eager launches; ours graph / compiled graph: CUDA graphs (mode='reduce-overhead')")
    print(f"{'config':14}{'pass':9}{'ours':>8}{'compiled':>10}{'x':>6}{'ours graph':>12}{'compiled graph':>16}"
          f"{'x':>6}{'gmm eager':>11}{'hf loop':>9}{'x loop':>8}")
    for name, blocks, _, _ in table:
        for phase in ("fwd", "fwd+bwd"):
            t = {peer: blocks.get((peer, phase), float("nan"))
                 for peer in ("ours", "ours_graph", "hf_compiled", "hf_compiled_graph", "hf_grouped_eager", "hf_loop")}
            print(f"{name:14}{phase:9}{t['ours']:8.3f}{t['hf_compiled']:10.3f}{t['hf_compiled'] / t['ours']:6.2f}"
                  f"{t['ours_graph']:12.3f}{t['hf_compiled_graph']:16.3f}"
                  f"{t['hf_compiled_graph'] / t['ours_graph']:6.2f}{t['hf_grouped_eager']:11.3f}{t['hf_loop']:9.2f}"
                  f"{t['hf_loop'] / t['ours']:8.1f}")
    for name, _, ours_tflops, cutlass_tflops in table:
        print(f"{name:14}forward expert GEMMs: ours {ours_tflops:.0f} TFLOP/s ({ours_tflops / rate:.0%} of matmul), "
              f"torch._grouped_mm {cutlass_tflops:.0f} TFLOP/s ({cutlass_tflops / rate:.0%})")


if __name__ == "__main__":
    main()
