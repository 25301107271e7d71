"""The host paths around the kernels: replayed launches (`kernels.runtime.launching`, CUDA only) and the direct
eager calls of composite ops (`kernels.runtime.ops.direct_call`), each against the path it shortcuts."""
from __future__ import annotations

import weakref

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from fuser.kernels.runtime import launching


class _PassThrough(TorchDispatchMode):
    """A mode that changes nothing but makes every op dispatch (the path tracing takes)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run_both_paths(fn, *leaves):
    """(outputs, grads) of fn on the direct eager path and through the dispatcher."""
    results = []
    for mode in (None, _PassThrough()):
        inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
        if mode is None:
            out = fn(*inputs)
        else:
            with mode:
                out = fn(*inputs)
        differentiable = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(out, differentiable, torch.ones_like(out), retain_graph=True)
        # a retained graph runs its backward again
        again = torch.autograd.grad(out, differentiable, torch.ones_like(out))
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
        results.append((out.detach(), grads, type(out.grad_fn).__name__))
    return results


def _attention_case():
    q, k, v = torch.randn(2, 4, 19, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 16)

    def fn(q, k, v):
        return torch.ops.fuser.attention(q, k, v, None, 0.25, True, 0, True, 0.0, 0.0, -float("inf"))
    return fn, (q, k, v)


def _moe_experts_case():
    tokens, hidden, intermediate, experts, top_k = 9, 16, 12, 4, 2
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k)
    gate_up, down = torch.randn(experts, 2 * intermediate, hidden), torch.randn(experts, hidden, intermediate)

    def fn(x, ids, weights, gate_up, down):
        return torch.ops.fuser.moe_experts(x, ids, weights, gate_up, None, down)
    return fn, (x, ids, weights, gate_up, down)


def _moe_route_case():
    def fn(logits):
        return torch.ops.fuser.moe_route(logits, 2, "softmax", True, None, 1.5, torch.float32)[0]
    return fn, (torch.randn(9, 6),)


@pytest.mark.parametrize("case", [_attention_case, _moe_experts_case, _moe_route_case],
                         ids=["attention", "moe_experts", "moe_route"])
def test_direct_call_equals_the_op_path(case):
    torch.manual_seed(0)
    fn, leaves = case()
    (direct, direct_grads, direct_node), (dispatched, op_grads, op_node) = _run_both_paths(fn, *leaves)
    assert direct_node == "_DirectAutogradBackward" and op_node != direct_node
    assert torch.equal(direct, dispatched)
    for a, b in zip(direct_grads, op_grads):
        assert torch.equal(a, b)


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, x * factor, mask=offsets < n)


_scale_tuned = triton.autotune([triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 256})], key=["n"])(
    _scale_kernel)
# a heuristic that reads a tensor, not a scalar: replays must ask it again
_scale_by_heuristic = triton.heuristics({"BLOCK": lambda args: 64 if args["x_ptr"].dtype == torch.float16 else 256})(
    _scale_kernel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays are compiled launches (the GPU)")
@pytest.mark.parametrize("kernel", [_scale_kernel, _scale_tuned, _scale_by_heuristic],
                         ids=["jit", "autotuned", "heuristics"])
def test_replayed_launches_equal_triton_launches(kernel, monkeypatch):
    """Same tensors' layout: replayed; another alignment, scalar, dtype or a specialized value (n = 1):
    Triton's path and a new record. Every result is checked, and records keep no tensor alive."""
    jit = kernel.fn if isinstance(kernel, (triton.runtime.Autotuner, triton.runtime.Heuristics)) else kernel
    triton_launches = []
    run = jit.run
    monkeypatch.setattr(jit, "run", lambda *a, **kw: triton_launches.append(1) or run(*a, **kw))
    monkeypatch.setattr(launching, "_REPLAYS", {})
    base = torch.randn(4096 + 8, device="cuda")
    constexprs = {"BLOCK": 128} if kernel is _scale_kernel else {}
    cases = [  # (offset, n, factor, dtype, expect a Triton launch)
        (0, 4096, 2.0, torch.float32, True), (0, 4096, 2.0, torch.float32, False), (1, 4096, 2.0, torch.float32, True),
        (1, 4096, 2.0, torch.float32, False), (0, 4096, 3.0, torch.float32, True), (0, 1, 3.0, torch.float32, True),
        (0, 4096, 3.0, torch.float16, True), (0, 4096, 3.0, torch.float16, False)]
    for offset, n, factor, dtype, expect_triton in cases:
        x = base.to(dtype)[offset:offset + n]
        out = torch.full_like(x, float("nan"))
        before = len(triton_launches)
        launching.launch(kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), "scale", x, out, n, factor,
                       **constexprs)
        assert (len(triton_launches) > before) == expect_triton, (offset, n, factor, dtype)
        torch.testing.assert_close(out, x * factor, rtol=0, atol=0)
    alive = weakref.ref(out)
    del x, out
    assert alive() is None


@triton.jit
def _strided_affine_kernel(x_ptr, out_ptr, strides, sizes, factors, BLOCK: tl.constexpr):
    """out[i · strides[1]] = x[i · strides[0]] · factors[0] + factors[1] for i < sizes[0]: tuple arguments."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < sizes[0]
    x = tl.load(x_ptr + offsets * strides[0], mask=inside)
    tl.store(out_ptr + offsets * strides[1], x * factors[0] + factors[1], mask=inside)


@triton.jit
def _copy_first_kernel(inputs, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(inputs[0] + offsets).to(tl.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays are compiled launches (the GPU)")
def test_tuple_arguments_are_fingerprinted_by_value_and_type(monkeypatch):
    """Triton specializes each element of a tuple argument (== 1, divisibility by 16) and types it (an int
    and a float of equal value compile differently): a replay needs the same values and element types, and a
    tuple holding a tensor is never recorded."""
    triton_launches = []
    run = _strided_affine_kernel.run
    monkeypatch.setattr(_strided_affine_kernel, "run", lambda *a, **kw: triton_launches.append(1) or run(*a, **kw))
    monkeypatch.setattr(launching, "_REPLAYS", {})
    base = torch.randn(2 * 4096, device="cuda")
    cases = [  # (strides, factors, expect a Triton launch)
        ((1, 1), (2.0, 1.0), True), ((1, 1), (2.0, 1.0), False), ((2, 1), (2.0, 1.0), True),
        ((2, 1), (2.0, 1.0), False), ((2, 1), (2.0, 3.0), True), ((2, 1), (2, 3.0), True), ((2, 1), (2, 3.0), False),
        ((2, 1), (2.0, 3.0), True)]
    for strides, factors, expect_triton in cases:
        n = 4096
        out = torch.full((n,), float("nan"), device="cuda")
        before = len(triton_launches)
        launching.launch(_strided_affine_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), "affine", base, out,
                         strides, (n,), factors, BLOCK=256)
        assert (len(triton_launches) > before) == expect_triton, (strides, factors)
        torch.testing.assert_close(out, base[::strides[0]][:n] * factors[0] + factors[1], rtol=0, atol=0)
    copies = []
    run_copy = _copy_first_kernel.run
    monkeypatch.setattr(_copy_first_kernel, "run", lambda *a, **kw: copies.append(1) or run_copy(*a, **kw))
    for dtype in (torch.float32, torch.float32, torch.float16):  # a tensor inside a tuple: Triton's path each time
        x = base[:n].to(dtype)
        out = torch.empty(n, device="cuda")
        launching.launch(_copy_first_kernel, (n // 256,), "copy", (x,), out, BLOCK=256)
        torch.testing.assert_close(out, x.float(), rtol=0, atol=0)
    assert len(copies) == 3 and "copy" not in launching._REPLAYS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays are compiled launches (the GPU)")
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "key_padding"])
def test_attention_launches_replay_with_the_same_results(masked, monkeypatch):
    """The attention kernels take strides, sizes and literals as tuples: a second call of the same layout
    replays every launch (no Triton launch) and gives what Triton's own launches give."""
    from fuser.kernels.attention import AttentionLiterals
    triton_launches = []
    run = triton.runtime.JITFunction.run
    monkeypatch.setattr(triton.runtime.JITFunction, "run",
                        lambda self, *a, **kw: triton_launches.append(self) or run(self, *a, **kw))
    monkeypatch.setattr(launching, "_REPLAYS", {})
    literals = AttentionLiterals(0.125, causal=True)

    def call(seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(2, 4, 100, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        mask = (torch.rand(2, 1, 1, 100, device="cuda", generator=generator) > 0.2) if masked else None
        out = literals.call(q, k, v, mask)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    call(0)
    assert triton_launches
    triton_launches.clear()
    replayed = call(1)
    assert not triton_launches
    monkeypatch.setattr(launching, "_REPLAYS", {})
    launched = call(1)
    assert triton_launches
    for a, b in zip(replayed, launched):  # a causal row whose visible keys are all padded is NaN in both
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
