"""The chunkwise gated delta rule (transformers' `torch_chunk_gated_delta_rule`, the prefill fallback without
flash-linear-attention) → one `fuser::gated_delta_rule`, found by structure.

Dynamo gives a prologue (pad the time dim to a multiple of the chunk size C, the WY system solved by
`solve_triangular`, decayed q and k, pairwise and per-chunk decays), one step per chunk threading the state
(`chunk_step`), the outputs written into a buffer, and an epilogue (reshape back, drop the padding). The three
searches below are written as transformers writes them and matched as one site (`Chain.prologue`, `epilogue`);
what the op is given are the prologue's inputs (q, k, v, g, β as transformers has made them: [B, H, T, ·],
float32, l2-normed and scaled: that stays in the graph) and the first state.

Why that is the same function: the chunk algorithm computes the recurrence exactly (in exact arithmetic) for
any C; the padded positions read q = k = v = 0, β = 0 and g = 0 (`F.pad` with zeros, checked), so the state
after them is the state after T tokens (k = 0: no update, exp(0) = 1: no decay) and their outputs are sliced
off by the epilogue (`[:, :, :T]`, T checked). `check` proves every literal the reading depends on: the pads,
the mask `ones(C, C, bool).triu(1)`, each reshape's sizes, the chunk count the steps cover. transformers' other
spelling (a 63-step forward substitution instead of `solve_triangular`) runs only under `torch.export`, which
never reaches the backend; it is not matched.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from .base import Chain, Example
from .nodes import known_equal, tensor_meta


def chunk_prologue(q, k, v, g, beta, pad, mask, b, h, n, chunk, dk, dv):
    """What the steps slice, from q, k [B, H, T, Dk], v [B, H, T, Dv], g, beta [B, H, T] (transformers 5.17-5.24)."""
    q, k, v = (torch._C._nn.pad(x, (0, 0, 0, pad), "constant", None) for x in (q, k, v))
    beta, g = (torch._C._nn.pad(x, (0, pad), "constant", None) for x in (beta, g))
    v_beta = v * beta.unsqueeze(-1)
    k_beta = k * beta.unsqueeze(-1)
    q, k, k_beta = (x.reshape(b, h, n, chunk, dk) for x in (q, k, k_beta))
    v_beta = v_beta.reshape(b, h, n, chunk, dv)
    g = g.reshape(b, h, n, chunk)
    cum = g.cumsum(dim=3)
    pairwise = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(mask, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    attn = (q @ k.transpose(-1, -2)) * pairwise
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    return u, w, q, attn, cum[..., -1].exp()[..., None, None], k


def chunk_step(state, u, w, q_decayed, attn, chunk_decay, k_decayed):
    """One chunk: state [B, H, Dk, Dv]; u [B, H, C, Dv]; w, q_decayed, k_decayed [B, H, C, Dk]; attn [B, H, C, C]."""
    v_new = u - w @ state
    out = q_decayed @ state + attn @ v_new
    state = state * chunk_decay + k_decayed.transpose(-1, -2) @ v_new
    return state, out


def chunk_epilogue(out, shape, length):
    """The outputs [B, H, N, C, Dv] back to [B, H, T, Dv]."""
    return out.reshape(shape)[:, :, :length]


def chunk_epilogue_unpadded(out, shape):
    """The same when T is a multiple of C (Dynamo drops `[:, :, :T]`)."""
    return out.reshape(shape)


CHUNK_STEP = Chain(state="state", sliced=("u", "w", "q_decayed", "attn", "chunk_decay", "k_decayed"),
                   prologue=chunk_prologue, epilogues=(chunk_epilogue, chunk_epilogue_unpadded))


def _same(x, want) -> bool:
    return x is not None and x.dim() == len(want) and all(known_equal(a, b) for a, b in zip(x.shape, want))


def _mask_problem(mask, chunk) -> str | None:
    ones = mask.args[0] if getattr(mask, "op", None) == "call_method" and mask.target == "triu" and \
        mask.args[1:] == (1,) and not mask.kwargs else None
    if ones is None or ones.op != "call_function" or ones.target is not torch.ones or ones.args != (chunk, chunk) \
            or set(ones.kwargs) - {"dtype", "device"} or ones.kwargs.get("dtype") is not torch.bool:
        return f"the pairwise decays are masked by {getattr(mask, 'name', mask)}, not ones({chunk}, {chunk}).triu(1)"
    return None


def chunk_problem(m) -> str | None:
    """Every literal the chunkwise reading depends on, proved from the graph, or why not."""
    metas = {name: tensor_meta(m.bindings[name]) for name in ("q", "k", "v", "g", "beta")}
    if any(t is None for t in metas.values()) or metas["q"].dim() != 4:
        return "the chunkwise inputs have no recorded shapes or q is not [B, H, T, Dk]"
    b, h, length, dk = metas["q"].shape
    dv = metas["v"].shape[-1] if metas["v"].dim() == 4 else None
    want = {"q": (b, h, length, dk), "k": (b, h, length, dk), "v": (b, h, length, dv), "g": (b, h, length),
            "beta": (b, h, length)}
    for name, shape in want.items():
        if not _same(metas[name], shape):
            return f"the chunkwise code reads {name} of shape {list(metas[name].shape)}, not {list(shape)}"
    dtypes = {t.dtype for t in metas.values()}
    if len(dtypes) != 1 or dtypes & {torch.float32, torch.float64} != dtypes:
        return f"the chunkwise code computes in {sorted(map(str, dtypes))}, not one of float32, float64"
    pad, chunk = m["pad"], m["chunk"]
    if not all(isinstance(x, int) for x in (pad, chunk, length, m["b"], m["h"], m["n"], m["dk"], m["dv"])):
        return "the chunkwise code's sizes are symbolic (dynamic shapes); only static sizes are read"
    chunks = (length + pad) // chunk if chunk > 0 else 0
    if pad < 0 or chunk <= 0 or (length + pad) % chunk or (m["b"], m["h"], m["dk"], m["dv"]) != (b, h, dk, dv) \
            or m["n"] not in (-1, chunks):
        return (f"the padding ({pad}) or the chunk reshapes ({m['b']}, {m['h']}, {m['n']}, {chunk}, {m['dk']} / "
                f"{m['dv']}) do not split [B, H, T + pad] = {[b, h, length + pad]} into chunks of {chunk}")
    problem = _mask_problem(m.bindings["mask"], chunk)
    if problem:
        return problem
    reading = m["chain"]
    if reading.start != 0 or reading.length != chunks or reading.out_dim % 5 != 2:
        return f"the chunk steps cover chunks {reading.start} … {reading.start + reading.length - 1} of {chunks}"
    kept = m.get("length", length + pad)  # no slice: every padded position is kept
    if kept != length or list(m["shape"]) not in ([b, h, -1, dv], [b, h, chunks * chunk, dv]):
        return (f"the outputs are read back as reshape({m['shape']})[:, :, :{kept}], not as "
                f"[B, H, T] = {[b, h, length]} tokens")
    state = tensor_meta(m.bindings["state"])
    if not _same(state, (b, h, dk, dv)) or (not m["state_cast"] and state.dtype not in dtypes):
        return f"the first state is {list(state.shape) if state is not None else '?'}, not [B, H, Dk, Dv] of q's dtype"
    return None


def replace_chunks(m):
    """The op on the prologue's inputs (time to dim 1: views), its output back to [B, H, T, Dv]."""
    q, k, v, g, beta = (m[name].transpose(1, 2) for name in ("q", "k", "v", "g", "beta"))
    state = m["state"].to(m["q"]) if m["state_cast"] else m["state"]  # `initial.to(u)`: u has q's dtype, device
    result = torch.ops.fuser.gated_delta_rule(q, k, v, g, beta, state, 1.0, False)
    return result[0].transpose(1, 2), result[1]


def describe_chunks(m) -> str:
    tokens = tensor_meta(m.bindings["q"]).shape[2]
    return f"a chunkwise prefill of {tokens} tokens in {m['chain'].length} chunks of {m['chunk']}"


def chunked(q, k, v, g, beta, state, chunk_size):
    """transformers' chunkwise code on [B, H, T, ·] inputs (after its casts, l2norm and scale), a chunk size of
    one's own; the outputs and the final state as one tensor."""
    (b, h, length, dk), dv = q.shape, v.shape[-1]
    pad = (chunk_size - length % chunk_size) % chunk_size
    mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    u, w, q, attn, chunk_decay, k = chunk_prologue(q, k, v, g, beta, pad, mask, b, h, -1, chunk_size, dk, dv)
    out = torch.zeros_like(u)
    for i in range(u.shape[2]):
        state, out[:, :, i] = chunk_step(state, u[:, :, i], w[:, :, i], q[:, :, i], attn[:, :, i],
                                         chunk_decay[:, :, i], k[:, :, i])
    return torch.cat([chunk_epilogue(out, (b, h, -1, dv), length).flatten(), state.flatten()])


@st.composite
def chunk_programs(draw, arguments) -> Example:
    """`chunked` on the op's drawn arguments (unit keys, value heads), chunk sizes 4 or 8."""
    q, k, v, g, beta, initial_state, scale, _ = draw(arguments(max_length=20, max_head_dim=8))
    heads = v.shape[2]
    q, k = (torch.nn.functional.normalize(x.float(), dim=-1).repeat_interleave(heads // x.shape[2], dim=2)
            for x in (q, k))
    q, k, v, g, beta = (x.transpose(1, 2).float().contiguous() for x in (q * scale, k, v, g, beta))
    state = torch.zeros(v.shape[0], heads, k.shape[-1], v.shape[-1]) if initial_state is None else initial_state
    return Example(chunked, {"q": q, "k": k, "v": v, "g": g, "beta": beta, "state": state.float(),
                             "chunk_size": draw(st.sampled_from([4, 8]))})
