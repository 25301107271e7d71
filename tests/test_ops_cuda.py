"""The CUDA path of every op on the fused-op recipe (skipped without a GPU): bf16 values and gradients against
float64, no host sync, CUDA-graph capture of the eager path, `mode="reduce-overhead"`, and Inductor's generated
code launching our Triton kernels without calling the op.

    python -m pytest -q tests/test_ops_cuda.py
"""
from __future__ import annotations

import pytest
import torch

from numerics import assert_close
from test_ops import CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path")
DTYPE = torch.bfloat16


def _inputs(case):
    """Fresh leaves: floating ones require grad."""
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in case.leaves]


def _grad_out(case, seed=1):
    """A random gradient for the case's output, in its dtype and on its device."""
    out = case.entry(*case.leaves)
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(out.device)


def _forward_backward(fn, leaves, grad_out):
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_against_float64_without_a_host_sync(name):
    case, reference = CASES[name]("cuda", DTYPE), CASES[name]("cpu", torch.float64)
    leaves = _inputs(case)
    reference_leaves = [t.detach().double().cpu().requires_grad_(t.requires_grad) if t.is_floating_point()
                        else t.cpu() for t in leaves]
    grad_out = _grad_out(case)
    reference_grad_out = grad_out.cpu().to(reference.entry(*reference.leaves).dtype)
    _forward_backward(case.entry, leaves, grad_out)  # compiles and tunes outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads = _forward_backward(case.entry, leaves, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected, expected_grads = _forward_backward(reference.entry, reference_leaves, reference_grad_out)
    assert_close(out, expected, DTYPE)
    for ours, theirs in zip(grads, expected_grads):
        assert_close(ours, theirs, DTYPE)


@pytest.mark.parametrize("name", CASES)
def test_inductor_launches_the_kernels_and_never_calls_the_op(name):
    from torch._inductor.utils import run_and_get_code

    case = CASES[name]("cuda", DTYPE)
    grad_out = _grad_out(case)
    eager_out, eager_grads = _forward_backward(case.entry, _inputs(case), grad_out)
    torch._dynamo.reset()
    compiled = torch.compile(case.entry, backend="inductor", fullgraph=True)
    (out, grads), codes = run_and_get_code(_forward_backward, compiled, _inputs(case), grad_out)
    code = "\n".join(codes)
    assert len(codes) >= 2, "a forward and a backward graph"
    for kernel in case.kernels:
        assert f"def {kernel}(" in code, f"{kernel} is not in Inductor's generated code"
    assert "torch.ops.fuser." not in code, "the generated code calls a fuser op"
    assert_close(out, eager_out, DTYPE)
    for ours, theirs in zip(grads, eager_grads):
        assert_close(ours, theirs, DTYPE)


# the leaves' dims made symbolic (case leaf -> dims), and a narrower size of each to run the same graph at
DYNAMIC = {"rms_norm": ({0: (0, 1)}, lambda x, w: (x[:2, :4], w)),
           "softmax": ({0: (0, 1)}, lambda x: (x[:3, :2],)),
           "attention": ({0: (2,)}, lambda q, k, v: (q[:, :, :17], k, v))}  # Lq; the case's mask fixes B and Lk


def _random_backward(fn, leaves):
    """(output, gradients) of fn on leaves for a gradient drawn from a fixed seed."""
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return out, torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)


@pytest.mark.parametrize("name", DYNAMIC)
def test_symbolic_sizes_launch_the_kernels_in_one_graph(name):
    """With symbolic sizes (dynamic shapes) Inductor's code launches the kernels too, never calls the op, and one
    graph serves two sizes, values and gradients as eager's (tests/test_ops_symbolic.py: the traced graphs)."""
    from torch._inductor.utils import run_and_get_code

    dims, narrower = DYNAMIC[name]
    case = CASES[name]("cuda", DTYPE)
    leaves = _inputs(case)
    small = [t.detach().clone().requires_grad_(t.requires_grad) for t in narrower(*leaves)]  # contiguous
    for position, symbolic in dims.items():
        for dim in symbolic:
            torch._dynamo.mark_dynamic(leaves[position], dim)
    compiled = torch.compile(case.entry, backend="inductor", fullgraph=True)

    def both_sizes():
        torch._dynamo.utils.counters.clear()
        return [_random_backward(compiled, inputs) for inputs in (leaves, small)]
    results, codes = run_and_get_code(both_sizes)
    code = "\n".join(codes)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "one graph for both sizes"
    for kernel in case.kernels:
        assert f"def {kernel}(" in code, f"{kernel} is not in Inductor's generated code"
    assert "torch.ops.fuser." not in code, "the generated code calls a fuser op"
    for (out, grads), inputs in zip(results, (leaves, small)):
        expected, expected_grads = _random_backward(case.entry, [t.detach().clone().requires_grad_(t.requires_grad)
                                                                 for t in inputs])
        assert_close(out, expected, DTYPE)
        for ours, theirs in zip(grads, expected_grads):
            assert_close(ours, theirs, DTYPE)


@pytest.mark.parametrize("name", CASES)
def test_cuda_graphs_replay_the_eager_path(name):
    """Forward and backward captured in one CUDA graph replay on new values what eager computes."""
    case, fresh = CASES[name]("cuda", DTYPE), CASES[name]("cuda", DTYPE, seed=7)
    static, grad_out = _inputs(case), _grad_out(case)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _forward_backward(case.entry, static, grad_out)  # tuning and compiling before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grads = _forward_backward(case.entry, static, grad_out)
    with torch.no_grad():
        for target, source in zip(static, fresh.leaves):
            target.copy_(source)
    graph.replay()
    expected, expected_grads = _forward_backward(case.entry, _inputs(fresh), grad_out)
    assert torch.equal(out, expected)
    for ours, theirs in zip(grads, expected_grads):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", CASES)
def test_reduce_overhead_mode(name):
    case = CASES[name]("cuda", DTYPE)
    torch._dynamo.reset()
    compiled = torch.compile(case.entry, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expected = case.entry(*case.leaves)
        for _ in range(3):  # warm-up, recording, replay
            out = compiled(*case.leaves)
        assert_close(out.clone(), expected, DTYPE)
