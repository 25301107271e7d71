"""The fused-op recipe (`kernels.runtime.ops`) on every op built with it: opcheck (schema, fake against real,
autograd registration, AOT dispatch), the direct eager call against the op path, and what Inductor gets when
it traces the ops on CUDA tensors (Triton launches, no op call), checked on CPU with fake CUDA tensors.

The cases are shared with tests/test_ops_cuda.py, which runs them on a GPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import fuser  # noqa: F401  (registers torch.ops.fuser.*)
from fuser.kernels.runtime import ops


@dataclass
class Case:
    """An entry op on inputs: `entry(*leaves)` is a tensor; `ops` are (op overload, arguments) of the fused ops
    beneath, forward and backward; `kernels` the Triton kernels those launch."""
    entry: Callable
    leaves: tuple
    ops: list = field(default_factory=list)
    kernels: frozenset = frozenset()


def _draw(generator, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)


def rms_norm_case(device="cpu", dtype=torch.float32, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x, weight, grad = _draw(g, device, dtype, 3, 5, 40), _draw(g, device, dtype, 40), _draw(g, device, dtype, 3, 5, 40)
    return Case(lambda x, w: torch.ops.fuser.rms_norm(x, w, 1e-6, 0.0, False, dtype), (x, weight),
                [(torch.ops.fuser.rms_norm_forward.default, (x, weight, 1e-6, 0.0, False, dtype)),
                 (torch.ops.fuser.rms_norm_backward.default, (grad, x, weight, 1e-6, 0.0))],
                frozenset({"_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_sum_partials_kernel"}))


def softmax_case(device="cpu", dtype=torch.float32, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x, grad = _draw(g, device, dtype, 4, 3, 33, scale=3.0), _draw(g, device, dtype, 4, 3, 33)
    return Case(lambda x: torch.ops.fuser.softmax(x, dtype), (x,),
                [(torch.ops.fuser.softmax_forward.default, (x, dtype)),
                 (torch.ops.fuser.softmax_backward.default, (grad, x))],
                frozenset({"_softmax_forward_kernel", "_softmax_backward_kernel"}))


def moe_route_case(device="cpu", dtype=torch.float32, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    # scores half a unit apart: no ties, even in bf16, so every dtype chooses the same experts
    ranks = torch.stack([torch.randperm(6, generator=g) for _ in range(9)])
    logits = (ranks * 0.5 + torch.rand(9, 6, generator=g) * 0.1).to(dtype).to(device)
    arguments = (2, "softmax", True, None, 1.5, torch.float32)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(9)]).to(device)
    return Case(lambda logits: torch.ops.fuser.moe_route(logits, *arguments)[0], (logits,),
                [(torch.ops.fuser.moe_route_forward.default, (logits, *arguments)),
                 (torch.ops.fuser.moe_route_backward.default,
                  (_draw(g, device, torch.float32, 9, 2), logits, ids, "softmax", True, 1.5))],
                frozenset({"_route_forward_kernel", "_route_backward_kernel"}))


def moe_experts_case(device="cpu", dtype=torch.float32, seed=0, gpt_oss=False) -> Case:
    """The experts on [E, 2I, H] / [E, H, I] weights; `gpt_oss`: with biases and the clamped SwiGLU."""
    g = torch.Generator().manual_seed(seed)
    tokens, hidden, intermediate, experts, top_k = 9, 16, 12, 4, 2
    x = _draw(g, device, dtype, tokens, hidden)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, generator=g).to(dtype).to(device)
    gate_up = _draw(g, device, dtype, experts, 2 * intermediate, hidden, scale=hidden ** -0.5)
    down = _draw(g, device, dtype, experts, hidden, intermediate, scale=intermediate ** -0.5)
    biases = (_draw(g, device, dtype, experts, 2 * intermediate), _draw(g, device, dtype, experts, hidden))
    experts_args = ((gate_up, None, down, biases[0], None, biases[1], "clamped_swiglu", 1.702, 0.7) if gpt_oss
                    else (gate_up, None, down, None, None, None, "silu", 1.0, 0.0))
    forward = (x, ids, weights, *experts_args, True)
    _, plan, act, h = torch.ops.fuser.moe_experts_forward(*forward)
    backward = (_draw(g, device, dtype, tokens, hidden), x, ids, weights, *experts_args, plan, act, h,
                True, True, True)

    def entry(x, ids, weights, gate_up, down, *biases):
        return torch.ops.fuser.moe_experts(x, ids, weights, gate_up, None, down,
                                           *((biases[0], None, biases[1]) if biases else (None,) * 3),
                                           *experts_args[6:])
    return Case(entry, (x, ids, weights, gate_up, down, *(biases if gpt_oss else ())),
                [(torch.ops.fuser.moe_experts_forward.default, forward),
                 (torch.ops.fuser.moe_experts_backward.default, backward)],
                frozenset({"_place_kernel", "_expert_rows_gemm_kernel", "_over_topk_kernel",
                           "_expert_weight_grads_kernel"}))


def moe_experts_gpt_oss_case(device="cpu", dtype=torch.float32, seed=0) -> Case:
    return moe_experts_case(device, dtype, seed, gpt_oss=True)


def mla_decode_case(device="cpu", dtype=torch.float32, seed=0) -> Case:
    """The forward only: the backward is plain torch (the reference formula; tests/test_kernel_mla_decode.py)."""
    g = torch.Generator().manual_seed(seed)
    q_lat, q_pe = _draw(g, device, dtype, 2, 2, 4, 24), _draw(g, device, dtype, 2, 2, 4, 8)
    c, k_pe = _draw(g, device, dtype, 2, 37, 24), _draw(g, device, dtype, 2, 37, 8)
    return Case(lambda *tensors: torch.ops.fuser.mla_decode(*tensors, 0.18), (q_lat, q_pe, c, k_pe),
                [(torch.ops.fuser.mla_decode_forward.default, (q_lat, q_pe, c, k_pe, 0.18))],
                frozenset({"_mla_decode_kernel"}))


def attention_case(device="cpu", dtype=torch.float32, seed=0, dropout_p=0.0, sinks=False) -> Case:
    """Causal GQA attention with a key-padding mask (tile classes), every row seeing its first key; with
    dropout, the ops take a seed tensor (the entry op draws one per call); with sinks, a per-head sink logit."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = _draw(g, device, dtype, 2, 4, 24, 16), _draw(g, device, dtype, 2, 2, 24, 16), \
        _draw(g, device, dtype, 2, 2, 24, 16)
    mask = torch.rand(2, 1, 1, 24, generator=g) > 0.3
    mask[..., 0] = True
    mask = mask.to(device)
    literals = (0.25, True, 0, False, 0.0, dropout_p, -math.inf, "fill")
    dropout_seed = torch.tensor(1234, device=device) if dropout_p > 0 else None
    sink_logits = _draw(g, device, dtype, 4) if sinks else None
    forward = (q, k, v, mask, *literals, dropout_seed, sink_logits)
    out, stats, classes = torch.ops.fuser.attention_forward(*forward)
    backward = (_draw(g, device, dtype, *out.shape), q, k, v, mask, out, stats, classes, dropout_seed, *literals,
                sink_logits, False)  # mask_grad: a bool mask takes none (tests/test_attention_bias.py: a float one)
    return Case(lambda q, k, v: torch.ops.fuser.attention(q, k, v, mask, *literals), (q, k, v),
                [(torch.ops.fuser.attention_forward.default, forward),
                 (torch.ops.fuser.attention_backward.default, backward)],
                frozenset({"_classify_tiles_kernel", "_attention_forward_kernel", "_backward_preprocess_kernel",
                           "_attention_dkdv_kernel", "_attention_dq_kernel"}))


CASES = {"rms_norm": rms_norm_case, "softmax": softmax_case, "moe_route": moe_route_case,
         "moe_experts": moe_experts_case, "moe_experts_gpt_oss": moe_experts_gpt_oss_case,
         "mla_decode": mla_decode_case, "attention": attention_case}


def _detached(args):
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name", CASES)
def test_opcheck(name):
    """Schema, fake against real outputs, autograd registration, AOT dispatch (static and dynamic shapes)."""
    for op, args in CASES[name]().ops:
        leaves = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                       and op._name.endswith("_forward") else a for a in _detached(args))
        torch.library.opcheck(op, leaves)


def run_both_paths(fn, leaves):
    """(outputs, grads, grad_fn names) of fn on the direct eager path and through the dispatcher."""
    from test_launch import _PassThrough

    results = []
    for mode in (None, _PassThrough()):
        inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
        with mode or torch.autograd.grad_mode.enable_grad():
            out = fn(*inputs)
        differentiable = [t for t in inputs if t.requires_grad]
        grad = torch.ones_like(out)
        grads = torch.autograd.grad(out, differentiable, grad, retain_graph=True)
        again = torch.autograd.grad(out, differentiable, grad)  # a retained graph runs its backward again
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
        results.append((out.detach(), grads, type(out.grad_fn).__name__))
    return results


@pytest.mark.parametrize("name", ["rms_norm", "softmax", "mla_decode", "attention"])
def test_direct_call_equals_the_op_path(name):
    """The entry ops built on the recipe take the direct path in eager (moe_route and moe_experts: test_launch.py)."""
    case = CASES[name]()
    (direct, direct_grads, direct_node), (dispatched, op_grads, op_node) = run_both_paths(case.entry, case.leaves)
    assert direct_node == "_DirectAutogradBackward" and op_node != direct_node
    assert torch.equal(direct, dispatched)
    for a, b in zip(direct_grads, op_grads):
        assert torch.equal(a, b)


def test_static_means_every_size_an_int():
    """`_static`: the calls every op traces into launches; a symbolic size needs the op's `symbolic=` (an op without
    it keeps the op: tests/test_ops_symbolic.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(*dims):
        return mode.from_tensor(torch.empty(8, 16), symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
    symbolic, static = fake(DimDynamic.DYNAMIC, DimDynamic.STATIC), fake(DimDynamic.STATIC, DimDynamic.STATIC)
    assert ops._static((static, 1.0, 3)) and not ops._static((static, symbolic, 1.0))
    assert not ops._static((static, symbolic.shape[0]))


# --- what Inductor traces: a subprocess without the interpreter, fake CUDA tensors ---------------------------

class _Traced(Exception):
    def __init__(self, graph):
        self.graph = graph


def _capture(gm, _):
    raise _Traced(gm.graph)


def _traced_graph(op, args):
    """The graph AOTAutograd hands to its compiler for `op(*args)` (args fake), inference only."""
    from torch._functorch.aot_autograd import aot_function

    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def call(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return op(*full)
    try:
        aot_function(call, fw_compiler=_capture)(*[args[i] for i in positions])
    except _Traced as traced:
        return traced.graph
    raise AssertionError("AOTAutograd compiled nothing")


def _not_for_inductor(kernel, constant_args: dict) -> list[str]:
    """What Inductor's generated code could not launch (checked without a GPU): a tuple passed as a runtime
    argument (it has no type there), a constexpr whose repr does not read back without imports (the generated
    code spells constexprs by repr), a global of the kernel's source closure that does not resolve there."""
    import builtins
    import dis
    import importlib.util
    import tempfile

    import triton
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    problems = []
    for param in kernel.params:
        value = constant_args.get(param.name)
        if param.is_constexpr:
            try:
                readable = eval(repr(value), {"triton": triton}) == value  # noqa: S307 (our own constants)
            except Exception:  # noqa: BLE001
                readable = False
            if not readable:
                problems.append(f"constexpr {param.name}={value!r}")
        elif isinstance(value, tuple):
            problems.append(f"tuple argument {param.name}")
    source = f"{TritonKernel.gen_common_triton_imports()}\n@triton.jit\n" + \
        user_defined_triton_kernel_transitive_closure_source_code(kernel)  # as Inductor writes it
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(f"generated_{kernel.__name__}", file.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for value in vars(module).values():
        if isinstance(value, triton.runtime.JITFunction):
            problems += [f"{value.__name__} reads {inst.argval}" for inst in dis.Bytecode(value.fn)
                         if inst.opname == "LOAD_GLOBAL" and inst.argval not in vars(module)
                         and not hasattr(builtins, inst.argval)]
    return problems


def _launched_kernels(graph) -> tuple[list[str], list[str]]:
    """(Triton kernels launched through wrap_triton, other fuser:: / host-sync ops called and launches Inductor
    could not generate) in `graph`."""
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernels, calls = [], []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while not isinstance(kernel, triton.runtime.JITFunction):
                kernel = kernel.fn
            kernels.append(kernel.fn.__name__)
            calls += _not_for_inductor(kernel, kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
        elif str(node.target).startswith("fuser.") or "_local_scalar_dense" in str(node.target):
            calls.append(str(node.target))
    return kernels, calls


def _trace_every_case() -> dict:
    """{case/op: [kernels, calls]} for every op of every case on fake CUDA tensors, plus two that keep the op."""
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    import fuser.kernels.attention.plan as attention_plan
    import fuser.kernels.mla_decode.decode as mla_decode_kernels
    import fuser.kernels.rms_norm as rms_norm_kernels

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)  # no GPU: no TTIR
    rms_norm_kernels.program_slots = attention_plan.program_slots = lambda device: 132  # the H200's; no device
    mla_decode_kernels.program_slots = rms_norm_kernels.program_slots
    traced = [(f"{name}/{op._name}", op, args, "cuda") for name, make in CASES.items()
              for op, args in make("cpu", torch.bfloat16).ops]
    traced += [(f"dropout/{op._name}", op, args, "cuda") for op, args in attention_case(
        "cpu", torch.bfloat16, dropout_p=0.2, sinks=True).ops]
    traced += [(f"{label}/{op._name}", op, args, device) for label, dtype, device in
               (("float64", torch.float64, "cuda"), ("cpu", torch.bfloat16, "cpu"))
               for op, args in rms_norm_case("cpu", dtype).ops[:1]]
    found = {}
    with FakeTensorMode():
        for key, op, args, device in traced:
            fake = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=device)
                         if isinstance(a, torch.Tensor) else a for a in args)
            found[key] = _launched_kernels(_traced_graph(op, fake))
    return found


def run_without_interpreter(script: str) -> dict:
    """The JSON a test script prints last, run as a subprocess without the interpreter (fake CUDA tensors)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(script))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def traced():
    return run_without_interpreter(__file__)


@pytest.mark.parametrize("name", CASES)
def test_inductor_gets_the_launches_not_the_op(traced, name):
    """Traced on CUDA tensors, each op becomes its Triton launches (planned at trace time, no host sync);
    Inductor's generated code launches them and never calls the op."""
    launched = set()
    for key, (kernels, calls) in traced.items():
        if key.startswith(name + "/"):
            assert kernels and not calls, (key, kernels, calls)
            launched.update(kernels)
    assert launched == CASES[name]().kernels


def test_dropout_reads_its_seed_on_the_device(traced):
    """With dropout (and sinks) the ops are their launches too: the seed is a tensor the kernels read (no host
    read), the sinks' gradient torch ops Inductor generates."""
    for key in ("dropout/fuser::attention_forward", "dropout/fuser::attention_backward"):
        kernels, calls = traced[key]
        assert kernels and not calls, (key, kernels, calls)


def test_calls_the_kernels_do_not_take_keep_the_op(traced):
    for key in ("float64/fuser::rms_norm_forward", "cpu/fuser::rms_norm_forward"):
        kernels, calls = traced[key]
        assert kernels == [] and calls == ["fuser.rms_norm_forward.default"], key


if __name__ == "__main__":  # the traced fixture's subprocess
    print(json.dumps(_trace_every_case()))
