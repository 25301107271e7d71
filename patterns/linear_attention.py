"""Linear attention (the gated delta rule) → `fuser::gated_delta_rule`, found by structure in traced loops.

Dynamo unrolls a per-token loop (transformers' `torch_recurrent_gated_delta_rule`, or a user's own) into a
chain of identical steps threading the state; the search below is one step, written as transformers writes
it, and the engine matches it along the state (`patterns.base.Chain`, `fuser/engine/chains.py`). The whole
chain becomes one op call: q, k, v, g, β are the tensors the steps slice (any layout: the op takes them
through strides), the chain's first state is the initial state, its outputs (written into a buffer or
stacked) and its last state are the op's two results. What comes before the loop (casts, transposes, the
l2norm of q and k, the query scale, repeated key heads) stays in the graph as it is: the op runs with
scale 1 and no l2norm on the values the steps read.

The same strategy of arguments serves the op's own tests, `fuser.fuzz("linear_attention")` (as a loop over
a drawn length) and the convert door's checks.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuser.kernels.gated_delta import LIMITS
from fuser.kernels.runtime import KERNEL_DTYPES
from .base import Chain, Example, Pattern, Search, dtype_name
from .linear_attention_chunks import CHUNK_STEP, chunk_problem, chunk_programs, chunk_step, describe_chunks, \
    replace_chunks
from .nodes import known_equal, tensor_meta
from .strategies import sizes, tensors

# log decays per token: none at all, near 1 (exp(g) ≈ 0.999), mixed, near 0 (exp(g) ≈ 1e-9)
DECAYS = {"none": (0.0, 0.0), "near one": (-1e-3, 0.0), "mixed": (-3.0, 0.0), "near zero": (-25.0, -15.0)}


def gated_delta_step(state, q, k, v, g, beta):
    """One token of the gated delta rule with a decay per head: state [B, H, Dk, Dv], q, k [B, H, Dk],
    v [B, H, Dv], g, beta [B, H] (transformers' `torch_recurrent_gated_delta_rule`, loop body)."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k[..., None]).sum(-2)
    state = state + k[..., None] * ((v - predicted) * beta[..., None])[..., None, :]
    return state, (state * q[..., None]).sum(-2)


def gated_delta_step_per_key(state, q, k, v, g, beta):
    """The same step with a decay per key channel (g [B, H, Dk]), which the kernels do not take yet."""
    state = state * g.exp()[..., None]
    predicted = (state * k[..., None]).sum(-2)
    state = state + k[..., None] * ((v - predicted) * beta[..., None])[..., None, :]
    return state, (state * q[..., None]).sum(-2)


STEP = Chain(state="state", sliced=("q", "k", "v", "g", "beta"))


def _shape_problem(m) -> str | None:
    """The step's shapes as the op takes them (no broadcasting hides another computation), or why not."""
    first = m["chain"].first
    state, next_state, output = (tensor_meta(n) for n in (first["state"], *m["chain"].first_returns))
    metas = {name: tensor_meta(first[name]) for name in STEP.sliced}
    if any(t is None for t in (state, next_state, output, *metas.values())):
        return "the step's values have no recorded shapes"
    if state.dim() != 4:
        return f"the state is {list(state.shape)}, not [B, H, Dk, Dv]"
    b, h, dk, dv = state.shape
    want = {"q": (b, h, dk), "k": (b, h, dk), "v": (b, h, dv), "g": (b, h), "beta": (b, h)}
    for name, shape in want.items():
        if metas[name].dim() != len(shape) or not all(known_equal(x, y) for x, y in zip(metas[name].shape, shape)):
            return f"the step reads {name} of shape {list(metas[name].shape)}, not {list(shape)} (state {list(state.shape)})"
    if tuple(next_state.shape) != tuple(state.shape) or tuple(output.shape) != (b, h, dv):
        return "the step's next state or output is broadcast to another shape"
    dtypes = {t.dtype for t in (state, next_state, output, *metas.values())}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (*LIMITS.dtypes, torch.float64):
        return f"the step computes in {', '.join(sorted(map(dtype_name, dtypes)))} (one of the op's dtypes is needed)"
    return None


def check(m) -> str | None:
    if m.search.function is chunk_step:
        return chunk_problem(m)
    if m.search.function is gated_delta_step_per_key:
        return ("the decay is per key channel (g_t [B, H, Dk]); fuser::gated_delta_rule takes one decay per head "
                "and token")
    return _shape_problem(m)


def _along_time(m, name: str):
    """The base tensor of a sliced input with time at dim 1 ([B, T, H, D] or [B, T, H]), the chain's span only."""
    reading, base = m["chain"], tensor_meta(m.bindings[name])
    x = m[name].movedim(reading.dims[name], 1)
    if reading.start != 0 or not known_equal(base.shape[reading.dims[name]], reading.length):
        x = x.narrow(1, reading.start, reading.length)
    return x


def replace(m):
    if m.search.function is chunk_step:
        return replace_chunks(m)
    reading = m["chain"]
    result = torch.ops.fuser.gated_delta_rule(*(_along_time(m, name) for name in STEP.sliced), m["state"], 1.0, False)
    out, final = result[0], result[1]
    stacked = reading.stacked
    out = out.movedim(1, reading.out_dim % stacked.dim())
    if stacked.dtype != tensor_meta(m.bindings["q"]).dtype:
        out = out.to(stacked.dtype)
    if stacked.is_contiguous():
        out = out.contiguous()
    final_dtype = tensor_meta(m.outputs[1]).dtype
    if final_dtype not in (torch.float32, torch.float64):
        final = final.to(final_dtype)
    return out, final


def describe(m) -> str:
    if m.search.function is chunk_step:
        return describe_chunks(m)
    reading = m["chain"]
    collected = "written into one buffer" if reading.form == "setitem" else "stacked"
    return (f"a recurrence of {reading.length} steps (outputs {collected}), "
            f"{dtype_name(tensor_meta(m.bindings['q']).dtype)}")


@st.composite
def gated_delta_arguments(draw, dtype: torch.dtype | None = None, max_length: int = 150, max_head_dim: int = 40):
    """(q, k, v, g, beta, initial_state, scale, l2norm): lengths below, at and past the chunk and the decode
    threshold, T = 1, value heads a multiple of key heads, head dims that are no power of two, every layout,
    β in [0, 1] (0 and 1 included), decays near 0 and near 1, normalized keys (l2norm) or unnormalized keys of
    about unit norm (the delta rule diverges for β‖k‖² > 2: no model feeds it such keys), an initial state or
    none. g stays float32, as transformers computes it."""
    dtype = dtype or draw(st.sampled_from(KERNEL_DTYPES))
    batch, length = draw(st.integers(1, 2)), draw(sizes(max_length))
    heads_k, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    dk, dv = draw(sizes(max_head_dim)), draw(sizes(max_head_dim))
    l2norm = draw(st.booleans())
    key_scale = 1.0 if l2norm else dk ** -0.5
    q = draw(tensors((batch, length, heads_k, dk), dtype))
    k = draw(tensors((batch, length, heads_k, dk), dtype, scale=key_scale))
    v = draw(tensors((batch, length, heads_k * groups, dv), dtype))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    low, high = DECAYS[draw(st.sampled_from(sorted(DECAYS)))]
    g = low + (high - low) * torch.rand(batch, length, heads_k * groups, generator=generator)
    beta = torch.rand(batch, length, heads_k * groups, generator=generator)
    beta[..., 0] = draw(st.sampled_from([0.0, 1.0, 0.5]))
    initial_state = None
    if draw(st.booleans()):
        initial_state = torch.randn(batch, heads_k * groups, dk, dv, generator=generator)
    return q, k, v, g, beta.to(dtype), initial_state, dk ** -0.5, l2norm


def recurrence(state, q, k, v, g, beta):
    """The step as a user's loop writes it: over dim 2 of [B, H, T, D] inputs, outputs stacked; the result
    holds the outputs and the final state (both are the op's results)."""
    outputs = []
    for t in range(q.shape[2]):
        state, o = gated_delta_step(state, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t])
        outputs.append(o)
    return torch.cat([torch.stack(outputs, dim=2).flatten(), state.flatten()])


@st.composite
def _loops(draw) -> Example:
    """A short loop (Dynamo unrolls it) on the op's drawn arguments, heads first, one dtype throughout."""
    q, k, v, g, beta, initial_state, _, l2norm = draw(gated_delta_arguments(max_length=5, max_head_dim=12))
    heads, dtype = v.shape[2], q.dtype
    q, k = (x.repeat_interleave(heads // x.shape[2], dim=2) for x in (q, k))
    if l2norm:  # unit keys: the delta rule stays bounded
        q, k = (torch.nn.functional.normalize(x.float(), dim=-1).to(dtype) for x in (q, k))
    q, k, v, g, beta = (x.transpose(1, 2).to(dtype) for x in (q, k, v, g, beta))
    state = torch.zeros(v.shape[0], heads, k.shape[-1], v.shape[-1]) if initial_state is None else initial_state
    return Example(recurrence, {"state": state.to(dtype), "q": q, "k": k, "v": v, "g": g, "beta": beta})


LINEAR_ATTENTION = Pattern(
    "linear_attention",
    (Search(chunk_step, lambda: chunk_programs(gated_delta_arguments), chain=CHUNK_STEP),
     Search(gated_delta_step, _loops, chain=STEP), Search(gated_delta_step_per_key, _loops, chain=STEP)),
    check, replace, describe, anchors=(torch.exp,))
