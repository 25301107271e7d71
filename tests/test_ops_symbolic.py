"""What Inductor traces of the fused ops under dynamic shapes (torch.compile(dynamic=True), or Dynamo's automatic
dynamic after a second shape: a decode step's growing cache, a new batch size): checked on CPU, as in
test_ops.py, in a subprocess without the interpreter, on fake CUDA tensors whose sizes are symbols of one
ShapeEnv (sizes Dynamo would share share a symbol).

An op that takes symbolic sizes (`fused_op(symbolic=...)`) becomes its Triton launches, grids and scalar
arguments symbolic, and its tracing adds no guard beyond the op's fake (which the opaque op adds as well:
attention's 32-bit offsets inside a head, L·stride < 2^31); an op that does not keeps the op.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import fuser  # noqa: F401  (registers torch.ops.fuser.*)
from test_ops import _launched_kernels, _traced_graph, run_without_interpreter

# the hints of the symbols (none is 0 or 1: Dynamo specializes those)
HINTS = {"B": 3, "T": 5, "L": 300, "Lq": 24, "Lk": 40, "N": 72}


def _attention_args(fake, b, lq, lk, mask, literals, sinks=False, dtype=torch.bfloat16):
    """(forward args, backward args) of fuser::attention_forward/backward on fake tensors; the backward's forward
    results come from the forward's fake."""
    q = fake(b, 4, lq, 16, dtype=dtype)
    k, v = fake(b, 2, lk, 16, dtype=dtype), fake(b, 2, lk, 32, dtype=dtype)
    masks = {"none": None, "padding": fake(b, 1, 1, lk, dtype=torch.bool), "full": fake(b, 1, lq, lk, dtype=torch.bool),
             "float": fake(1, 4, lq, lk, dtype=dtype)}
    seed = fake(dtype=torch.int64) if literals[5] > 0 else None
    forward = (q, k, v, masks[mask], *literals, seed, fake(4, dtype=dtype) if sinks else None)
    out, stats, classes = torch.ops.fuser.attention_forward.default(*forward)
    backward = (torch.empty_like(out), q, k, v, masks[mask], out, stats, classes, seed, *literals, forward[-1],
                mask == "float")
    return forward, backward


def _literals(causal=True, bottom_right=False, window=0, masking="fill", dropout_p=0.0):
    return (0.25, causal, window, bottom_right, 0.0, dropout_p, -math.inf, masking)


# case -> ((B, Lq, Lk), options of _attention_args); a size named by a string is that symbol
ATTENTION = {
    "decode_padding": (("B", 1, "Lk"), dict(mask="padding", literals=_literals(bottom_right=True))),
    "decode_no_mask": ((2, 1, "Lk"), dict(mask="none", literals=_literals(causal=False))),
    "decode_new_batch": (("B", 1, 40), dict(mask="padding", literals=_literals(bottom_right=True))),
    "decode_full_gpu": ((80, 1, "Lk"), dict(mask="none", literals=_literals(bottom_right=True))),  # 160 programs
    "prefill_causal": (("B", "L", "L"), dict(mask="none", literals=_literals())),
    "prefill_window_mask": ((2, "L", "L"), dict(mask="full", literals=_literals(window=7))),
    "chunk_bottom_right": ((2, "Lq", "Lk"), dict(mask="padding", literals=_literals(bottom_right=True))),
    "learned_bias": ((2, "Lq", "Lk"), dict(mask="float", literals=_literals(causal=False, masking="add"),
                                           dtype=torch.float32)),
    "sinks_dropout": (("B", "L", "L"), dict(mask="padding", literals=_literals(masking="sdpa", dropout_p=0.1),
                                            sinks=True)),
}
KERNELS = {
    "rms_norm": {"_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_sum_partials_kernel"},
    "softmax": {"_softmax_forward_kernel", "_softmax_backward_kernel"},
    "attention": {"_attention_forward_kernel", "_backward_preprocess_kernel", "_attention_dkdv_kernel",
                  "_attention_dq_kernel"},
}


def _cases(fake, size):
    """{case: [(op, args)]} on fake tensors; `size(name)` is a symbol's SymInt, shared by every case."""
    rms_norm, softmax = torch.ops.fuser.rms_norm_forward.default, torch.ops.fuser.softmax_forward.default
    cases = {}
    for label, cols in (("rows", 40), ("rows_and_cols", size("N"))):
        x, weight = fake(size("B"), size("T"), cols), fake(cols)
        cases[f"rms_norm/{label}"] = [(rms_norm, (x, weight, 1e-6, 0.0, False, torch.bfloat16)),
                                      (torch.ops.fuser.rms_norm_backward.default, (fake(*x.shape), x, weight, 1e-6,
                                                                                    0.0))]
        scores = fake(size("B"), 3, size("T"), cols)
        cases[f"softmax/{label}"] = [(softmax, (scores, torch.float32)),
                                     (torch.ops.fuser.softmax_backward.default, (fake(*scores.shape), scores))]
    for name, (sizes, options) in ATTENTION.items():
        forward, backward = _attention_args(fake, *(size(s) if isinstance(s, str) else s for s in sizes), **options)
        cases[f"attention/{name}"] = [(torch.ops.fuser.attention_forward.default, forward),
                                      (torch.ops.fuser.attention_backward.default, backward)]
    logits = fake(size("T"), 6, dtype=torch.float32)  # not symbolic-safe: keeps the op
    cases["moe_route/tokens"] = [(torch.ops.fuser.moe_route_forward.default,
                                  (logits, 2, "softmax", True, None, 1.5, torch.float32))]
    return cases


def _symbolic_launch(graph) -> bool:
    """Whether some launch's grid or scalar argument is an expression of the symbols (computed per call)."""
    return any(isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), torch.SymInt)
               for node in graph.nodes if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional
               for value in (*(v for grid in node.kwargs["grid"] for v in grid), *node.kwargs["kwargs"].values()))


def _trace_symbolic_cases() -> dict:
    """{case/op: {kernels, calls, guards, symbolic}} traced for Inductor with symbolic sizes."""
    import logging

    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import fuser.kernels.attention.plan as attention_plan
    import fuser.kernels.rms_norm as rms_norm_kernels

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)  # no GPU: no TTIR
    rms_norm_kernels.program_slots = attention_plan.program_slots = lambda device: 132  # the H200's; no device
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    symbols = {}

    def size(name):
        if name not in symbols:
            source = ConstantSource(name)
            symbols[name] = env.create_symintnode(env.create_symbol(HINTS[name], source), hint=HINTS[name],
                                                  source=source)
        return symbols[name]

    def fake(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="cuda")

    found = {}
    with mode:
        for case, calls in _cases(fake, size).items():
            for op, args in calls:
                before = len(env.guards)
                graph = _traced_graph(op, args)
                kernels, others = _launched_kernels(graph)
                found[f"{case}/{op._name}"] = dict(kernels=kernels, calls=others,
                                                   symbolic=_symbolic_launch(graph),
                                                   guards=[str(g.expr) for g in env.guards[before:]])
    return found


@pytest.fixture(scope="module")
def traced():
    return run_without_interpreter(__file__)


@pytest.mark.parametrize("family", KERNELS)
def test_symbolic_sizes_trace_the_launches(traced, family):
    """Each case of the family becomes its Triton launches (no op call, no host sync), some grid or scalar argument
    an expression of the symbolic sizes, no guard added (the fake made the arguments); together the cases launch
    every kernel."""
    launched = set()
    for key, found in traced.items():
        if key.startswith(family + "/"):
            assert found["kernels"] and not found["calls"], (key, found)
            assert found["symbolic"], key
            assert not found["guards"], (key, found["guards"])
            launched.update(found["kernels"])
    assert KERNELS[family] <= launched


def test_decode_splits_the_keys_of_a_symbolic_cache(traced):
    """A decode step (one query, few row blocks) over a symbolic cache length keeps flash-decoding: the key splits
    are an expression of the length (two at least), merged by the merge kernel; a prefill, or a batch whose
    programs fill the GPU already, runs one split."""
    for case in ("decode_padding", "decode_no_mask", "decode_new_batch"):
        assert "_merge_splits_kernel" in traced[f"attention/{case}/fuser::attention_forward"]["kernels"], case
    for case in ("prefill_causal", "decode_full_gpu"):
        assert "_merge_splits_kernel" not in traced[f"attention/{case}/fuser::attention_forward"]["kernels"], case


def test_ops_not_made_symbolic_keep_the_op(traced):
    """An op without `symbolic=` (MoE routing) traced with a symbolic size stays one opaque call."""
    found = traced["moe_route/tokens/fuser::moe_route_forward"]
    assert found["kernels"] == [] and found["calls"] == ["fuser.moe_route_forward.default"]


def test_known_reads_fixed_symbols_only():
    """`known`: an int, or a symbol a guard has fixed (a Dynamo input's head count once it meets a weight's shape),
    is read as its int; a free symbol is not."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fuser.kernels.runtime import known

    env = ShapeEnv()
    heads, length = (env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint,
                                           source=ConstantSource(name)) for name, hint in (("H", 4), ("L", 9)))
    assert heads == 4  # the guard that fixes it
    assert known(7) == 7 and known(heads) == 4 and type(known(heads)) is int
    assert known(length) is None and known(length * 2) is None


if __name__ == "__main__":  # the traced fixture's subprocess
    print(json.dumps(_trace_symbolic_cases()))
