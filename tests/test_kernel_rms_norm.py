"""`fuser::rms_norm` against float64: values, gradients, fake functions, torch.compile.

Runs the real Triton kernels through the interpreter on CPU (conftest.py). The interpreter
rounds to bf16 by truncation (the GPU rounds to nearest), one more reason bf16 gets its
tolerance. Shapes stay small; the block loop for long rows is reached with small blocks.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from fuser.kernels import rms_norm as kernel
from fuser.kernels.runtime import RowTiling
from fuser.kernels.rms_norm import rms_norm_reference
from fuser.patterns.strategies import FLOAT_DTYPES, sizes, tensors
from helpers import assert_compiled_matches_eager
from numerics import assert_close, on_kernel_device, tolerance

# (has weight, weight_offset, weight_before_cast): none, Llama, Olmo2, Gemma, and an offset after the cast.
WEIGHT_MODES = [(False, 0.0, False), (True, 0.0, False), (True, 0.0, True), (True, 1.0, True), (True, 1.0, False)]


@st.composite
def cases(draw, dtype: torch.dtype, max_rows_dims: int = 2, max_cols: int = 300):
    """Arguments of `fuser::rms_norm`: odd shapes, every dtype and layout, every weight form."""
    shape = tuple(draw(sizes(6)) for _ in range(draw(st.integers(0, max_rows_dims)))) + (draw(sizes(max_cols)),)
    x = draw(tensors(shape, dtype, scale=draw(st.sampled_from([1.0, 50.0]))))
    has_weight, offset, before_cast = draw(st.sampled_from(WEIGHT_MODES))
    weight = None
    if has_weight:
        weight_dtype = draw(st.sampled_from([dtype, torch.float32]))
        seed = draw(st.integers(0, 2**31 - 1))
        weight = (torch.randn(shape[-1], generator=torch.Generator().manual_seed(seed)) * 0.5 + 1).to(weight_dtype)
    natural_out = dtype if before_cast or weight is None else torch.promote_types(dtype, weight.dtype)
    out_dtype = draw(st.sampled_from([natural_out, torch.float32]))
    eps = draw(st.sampled_from([1e-6, 1e-5]))
    return x, weight, eps, offset, before_cast, out_dtype


def output_tolerance(x, weight, before_cast, out_dtype) -> float:
    """After the cast, the formula itself rounds to x's (and the weight's) dtype, whatever out_dtype is."""
    dtypes = [out_dtype] if before_cast or weight is None else [out_dtype, x.dtype, weight.dtype]
    return max(tolerance(d) for d in dtypes)


def float64_reference(x, weight, eps, offset, before_cast, grad_out):
    """The formula in float64 and its autograd gradients (dweight None without a weight)."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    out = rms_norm_reference(x64, w64, eps, offset, before_cast, torch.float64)
    out.backward(grad_out.double())
    return out, x64.grad, None if w64 is None else w64.grad


def grad_input_tolerance(x, weight, offset, eps, grad_out, ref_dx, dtype) -> float:
    """dx = rstd·g − (its projection on y): where the two nearly cancel (a row of length 1 gives
    dx ∝ eps), no float32 code, the original included, gets dx to float32's relative precision.
    So the error is measured against ‖rstd·g‖, the size of the terms, where that is larger."""
    x64, g = x.double(), grad_out.double() * (1.0 if weight is None else offset + weight.double())
    terms = (g * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).norm()
    return tolerance(dtype) * max(1.0, (terms / ref_dx.norm().clamp_min(1e-300)).item())


def check_against_float64(x, weight, eps, offset, before_cast, out_dtype, run):
    """`run(x, weight, grad_out) -> (out, dx, dw)` meets the numerics contract, values and gradients."""
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(out_dtype)
    out, dx, dw = run(x, weight, grad_out)
    ref, ref_dx, ref_dw = float64_reference(x, weight, eps, offset, before_cast, grad_out)
    assert out.dtype == out_dtype and out.shape == x.shape
    assert_close(out, ref, out_dtype, output_tolerance(x, weight, before_cast, out_dtype))
    assert dx.dtype == x.dtype
    assert_close(dx, ref_dx, x.dtype, grad_input_tolerance(x, weight, offset, eps, grad_out, ref_dx, x.dtype))
    if weight is not None:
        assert dw.dtype == weight.dtype
        assert_close(dw, ref_dw, weight.dtype)


def through_op(eps, offset, before_cast, out_dtype):
    """Forward and backward through the registered op and its autograd."""
    def run(x, weight, grad_out):
        x = x.detach().requires_grad_()
        weight = None if weight is None else weight.detach().requires_grad_()
        out = torch.ops.fuser.rms_norm(x, weight, eps, offset, before_cast, out_dtype)
        out.backward(grad_out)
        return out, x.grad, None if weight is None else weight.grad
    return run


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(data=st.data())
def test_values_and_gradients_match_float64(dtype, data):
    x, weight, eps, offset, before_cast, out_dtype = data.draw(cases(dtype))
    run = through_op(eps, offset, before_cast, out_dtype)
    check_against_float64(x, weight, eps, offset, before_cast, out_dtype, run)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tiling", [RowTiling(1, 16, 1), RowTiling(4, 32, 2)])
@given(data=st.data())
def test_rows_longer_than_a_block_loop_over_blocks(dtype, tiling, data):
    x, weight, eps, offset, before_cast, out_dtype = data.draw(cases(dtype, max_rows_dims=1, max_cols=200))

    def run(x, weight, grad_out):
        x, weight, grad_out = on_kernel_device(x, weight, grad_out)
        out = kernel.rms_norm_forward_launch(x, weight, eps, offset, before_cast, out_dtype, tiling)
        dx, dw = kernel.rms_norm_backward_launch(grad_out, x, weight, eps, offset, tiling)
        return out.cpu(), dx.cpu(), None if dw is None else dw.cpu()
    check_against_float64(x, weight, eps, offset, before_cast, out_dtype, run)


def test_long_rows_with_the_default_tiling():
    """Past the register-resident limit (16K columns forward, 8K backward) the kernels loop."""
    x = torch.randn(3, 20000, dtype=torch.bfloat16) * 3
    weight = torch.rand(20000, dtype=torch.bfloat16) + 0.5
    check_against_float64(x, weight, 1e-6, 0.0, False, torch.bfloat16, through_op(1e-6, 0.0, False, torch.bfloat16))


def test_weight_gradient_sums_over_many_programs():
    """More row tiles than persistent programs: each program adds several rows to its partial sum."""
    x = torch.randn(64, 96)
    weight = torch.randn(96)
    check_against_float64(x, weight, 1e-6, 1.0, True, torch.float32, through_op(1e-6, 1.0, True, torch.float32))


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 7), (3, 0), (16,)])
def test_empty_and_one_dimensional_inputs(shape):
    x, weight = torch.randn(shape), torch.rand(shape[-1]) + 0.5
    check_against_float64(x, weight, 1e-6, 0.0, True, torch.float32, through_op(1e-6, 0.0, True, torch.float32))


def test_float64_inputs_run_the_reference():
    x, weight = torch.randn(4, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    out = torch.ops.fuser.rms_norm(x, weight, 1e-6, 0.0, False, torch.float64)
    assert torch.equal(out, rms_norm_reference(x, weight, 1e-6, 0.0, False, torch.float64))


@pytest.mark.parametrize("has_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(has_weight, dtype):
    x = torch.randn(3, 5, 37, dtype=dtype).transpose(0, 1).requires_grad_()
    weight = torch.randn(37, dtype=dtype, requires_grad=True) if has_weight else None
    torch.library.opcheck(torch.ops.fuser.rms_norm.default, (x, weight, 1e-6, 0.0, False, dtype))
    plain_weight = None if weight is None else weight.detach()  # no double backward: plain inputs
    torch.library.opcheck(torch.ops.fuser.rms_norm_backward.default,
                          (torch.randn(5, 3, 37, dtype=dtype), x.detach(), plain_weight, 1e-6, 1.0))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gives_the_same_values(backend):
    def norm(x, weight):
        return torch.ops.fuser.rms_norm(x, weight, 1e-6, 0.0, False, torch.bfloat16)

    def forward_backward(fn):
        x = (torch.randn(6, 40) * 2).to(torch.bfloat16).requires_grad_()
        weight = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
        out = fn(x, weight)
        out.backward(torch.ones_like(out))
        return out, x.grad, weight.grad

    assert_compiled_matches_eager(norm, forward_backward, backend)
