"""The gated delta rule in plain torch: the per-token recurrence (the definition, the tests' oracle),
the chunkwise form (the op's path where no kernel runs) and the backward by recomputation.

Arguments as transformers' `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule` take them:
q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] with Hv a multiple of Hk (value head h reads key head
h // (Hv // Hk)); g (log decay) and beta [B, T, Hv]; the state [B, Hv, Dk, Dv]. Per token t:
    q, k ← q / ‖q‖, k / ‖k‖ (‖x‖ = sqrt(Σx² + 1e-6)) when `l2norm`;  q ← q · scale
    S ← S · exp(g_t)                       (g_t [Dk] decays each key channel: S ← S · exp(g_t)[:, None])
    S ← S + k_t ⊗ β_t (v_t − Sᵀk_t)
    o_t = Sᵀ q_t
computed in float32 (float64 for float64 inputs); o in q's dtype, the final state in the compute dtype.
"""
from __future__ import annotations

import torch

L2NORM_EPS = 1e-6  # transformers' and flash-linear-attention's l2norm


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (transformers upcasts everything to float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _heads_first(q, k, v, g, beta, scale: float, l2norm: bool, dtype: torch.dtype):
    """The inputs as [B, Hv, T, ...] in `dtype`, keys and queries repeated per value head, normalized, scaled."""
    groups = v.shape[2] // k.shape[2]
    q, k = (x.repeat_interleave(groups, dim=2) for x in (q, k))
    q, k, v, g, beta = (x.transpose(1, 2).to(dtype) for x in (q, k, v, g, beta))
    if l2norm:
        q, k = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS) for x in (q, k))
    return q * scale, k, v, g, beta


def _initial(initial_state, v, dk: int, dtype: torch.dtype) -> torch.Tensor:
    b, _, hv, dv = v.shape
    if initial_state is None:
        return torch.zeros(b, hv, dk, dv, dtype=dtype, device=v.device)
    return initial_state.to(dtype)


def recurrent_reference(q, k, v, g, beta, initial_state, scale: float, l2norm: bool):
    """(o, final state) token by token; g is [B, T, Hv] (a decay per head) or [B, T, Hv, Dk] (per key channel)."""
    dtype, out_dtype = compute_dtype(q, k, v, g, beta, initial_state), q.dtype
    state = _initial(initial_state, v, k.shape[-1], dtype)
    q, k, v, g, beta = _heads_first(q, k, v, g, beta, scale, l2norm, dtype)
    decay = g.exp() if g.dim() == 4 else g.exp()[..., None].expand(*k.shape)
    outputs = []
    for t in range(q.shape[2]):
        state = state * decay[:, :, t, :, None]
        predicted = (state * k[:, :, t, :, None]).sum(-2)
        state = state + k[:, :, t, :, None] * ((v[:, :, t] - predicted) * beta[:, :, t, None])[:, :, None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=2).transpose(1, 2).to(out_dtype), state


def chunked_reference(q, k, v, g, beta, initial_state, scale: float, l2norm: bool, chunk: int = 64,
                      out_dtype: torch.dtype | None = None):
    """(o, final state) as the recurrence computes them, a chunk of tokens at a time (a decay per head):
    within a chunk the updates fold into one unit-triangular system (the WY form) solved once,
    the state passes from chunk to chunk. Differentiable (the backward recomputes through it)."""
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = out_dtype or q.dtype
    length = q.shape[1]
    state = _initial(initial_state, v, k.shape[-1], dtype)
    if length == 0:  # transformers (5.25) passes no tokens where the cache keeps the state after each one
        return v.new_zeros(v.shape, dtype=out_dtype), state.clone()  # never the caller's tensor
    q, k, v, g, beta = _heads_first(q, k, v, g, beta, scale, l2norm, dtype)
    pad = -length % chunk
    q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    b, h, padded = g.shape
    q, k, v = (x.reshape(b, h, padded // chunk, chunk, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, h, padded // chunk, chunk) for x in (g, beta))
    g = g.cumsum(-1)  # log of the decay from the chunk's start to each token, inclusive
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(later, float("-inf")).exp()  # token j to token i >= j
    system = ((k * beta[..., None]) @ k.transpose(-1, -2) * decay).tril(-1)
    system = system + torch.eye(chunk, dtype=dtype, device=q.device)
    # u: what each token writes, w: how it reads the chunk's starting state (both through the system)
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k * (beta * g.exp())[..., None], upper=False, unitriangular=True)
    attention = (q @ k.transpose(-1, -2)) * decay
    outputs = []
    for c in range(padded // chunk):
        written = u[:, :, c] - w[:, :, c] @ state
        outputs.append((q[:, :, c] * g[:, :, c, :, None].exp()) @ state + attention[:, :, c] @ written)
        last = g[:, :, c, -1:]
        state = state * last[..., None].exp() + (k[:, :, c] * (last - g[:, :, c]).exp()[..., None]).transpose(-1, -2) \
            @ written
    return torch.cat(outputs, dim=2)[:, :, :length].transpose(1, 2).to(out_dtype), state


SEGMENT_CHUNKS = 16  # the backward recomputes this many chunks at a time (memory of one segment's autograd graph)


def backward_reference(grad_out, grad_state, q, k, v, g, beta, initial_state, scale: float, l2norm: bool,
                       chunk: int = 64):
    """(dq, dk, dv, dg, dbeta, dinitial_state) in float64 by recomputation: the states at segment starts
    from a forward pass without autograd, then each segment's autograd graph, last segment first, the
    state's gradient handed from segment to segment. dinitial_state is None without an initial state."""
    as64 = [None if t is None else t.detach().double() for t in (q, k, v, g, beta, initial_state)]
    q64, k64, v64, g64, beta64, state = as64
    length, segment = q.shape[1], SEGMENT_CHUNKS * chunk
    starts = list(range(0, length, segment)) or [0]
    states = []
    with torch.no_grad():
        for start in starts:
            states.append(state)
            piece = [x[:, start:start + segment] for x in (q64, k64, v64, g64, beta64)]
            _, state = chunked_reference(*piece, state, scale, l2norm, chunk)
    grads = [torch.zeros_like(x) for x in (q64, k64, v64, g64, beta64)]
    carried = torch.zeros_like(state) if grad_state is None else grad_state.double()
    for start, state in reversed(list(zip(starts, states))):
        piece = [x[:, start:start + segment].requires_grad_() for x in (q64, k64, v64, g64, beta64)]
        state = torch.zeros_like(carried) if state is None else state
        state = state.requires_grad_()
        with torch.enable_grad():
            out, final = chunked_reference(*piece, state, scale, l2norm, chunk, out_dtype=torch.float64)
            outputs, cotangents = [final], [carried]
            if grad_out is not None:
                outputs.append(out)
                cotangents.append(grad_out[:, start:start + segment].double())
            found = torch.autograd.grad(outputs, [*piece, state], cotangents, allow_unused=True)
        for total, part in zip(grads, found[:-1]):
            if part is not None:
                total[:, start:start + segment] += part
        carried = found[-1]
    return (*grads, None if initial_state is None else carried)
