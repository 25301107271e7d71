"""Latent attention (MLA decode) → `fuser::mla_decode`, found where a traced decode step expands the latent cache.

transformers (5.17, 5.24) writes a DeepSeek-V2/V3 decode step as: the whole cached latent c [B, 1, L, R]
through kv_b_proj, viewed [B, L, H, nope + v] and transposed, split into k_nope and the values, the keys joined
as [k_nope | k_pe expanded over the heads] (`new_empty` + two `copy_` into its slices; `torch.cat` too), then
attention over them. The search below is that code; the match becomes the absorbed form: q_nope·W_UK and
o_lat·W_UVᵀ with W_UK, W_UV views of kv_b_proj's weight read from the graph (absorbed once per call into the
new tokens' queries, never per cached token), `fuser::mla_decode` over c and k_pe themselves.

When: SDPA with no mask, no dropout, not causal, one new token (then every cached key is seen, which is the
kernel's causal bottom-right), and cheaper absorbed than expanded (`latent_is_cheaper`, proven for every
size the graph runs with): prefill (is_causal, Lq = L) stays expanded and goes on to `fuser::attention`;
a mask tensor (several new tokens, static caches) is a near miss — convert's door reads those.
The strategy of `fuser::mla_decode`'s arguments (kernel tests, `fuser.fuzz`) is here too.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from fuser.kernels.mla_decode import latent_is_cheaper
from fuser.kernels.runtime import KERNEL_DTYPES
from .base import Example, Pattern, Search, dtype_name, structural
from .nodes import known_equal, known_true, literal, tensor_meta
from .strategies import sizes, tensors


def _shape(node) -> tuple | None:
    meta = tensor_meta(node)
    return None if meta is None else tuple(meta.shape)


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def _split_part(node, index: int):
    """The split node when `node` is `torch.split(kv, sizes, dim=-1)[index]`, else None."""
    if not (getattr(node, "op", None) == "call_function" and node.target is operator.getitem
            and node.args[1] == index):
        return None
    split = node.args[0]
    if (getattr(split, "op", None) == "call_function" and split.target is torch.functional.split
            and split.kwargs == {"dim": -1} and len(split.args) == 2 and isinstance(split.args[1], (list, tuple))):
        return split
    return None


def _rope_expanded(node):
    """k_pe when `node` is `k_pe.expand(...)` from [B, 1, L, P] to [B, H, L, P] (its shapes say which), else None."""
    if not (getattr(node, "op", None) == "call_method" and node.target == "expand"):
        return None
    source, into = _shape(node.args[0]), _shape(node)
    if source is None or into is None or len(source) != 4 or len(into) != 4 or not known_equal(source[1], 1):
        return None
    return node.args[0] if _same_shape((source[0], *source[2:]), (into[0], *into[2:])) else None


def _parts(nope_part, rope_part):
    """(kv, sizes, k_pe, covered) for the two parts of the keys, or None."""
    split, k_pe = _split_part(nope_part, 0), _rope_expanded(rope_part)
    if split is None or k_pe is None or tensor_meta(k_pe).dtype != tensor_meta(split.args[0]).dtype:
        return None
    own_split = (split,) if len(split.users) == 1 else ()  # a split of its own (the values split kv again)
    return split.args[0], split.args[1], k_pe, (*own_split, nope_part, rope_part)


def _slice_copy(node, index):
    """The source of `node[index].copy_(source)` when that is all `node[index]` is used for, else None."""
    if not (node.op == "call_function" and node.target is operator.getitem and node.args[1] == index
            and len(node.users) == 1):
        return None
    (copy,) = node.users
    if copy.op == "call_method" and copy.target == "copy_" and len(copy.args) == 2 and not copy.kwargs \
            and copy.args[0] is node and _same_shape(_shape(copy.args[1]), _shape(node)):
        return copy.args[1], copy
    return None


def _comes_before(a, b) -> bool:
    node = a.next
    while node.op != "root":
        if node is b:
            return True
        node = node.next
    return False


def _joined_shapes(node):
    """key = [k_nope | k_pe over the heads] along the last dim: as transformers' `expand_kv` writes it
    (`kv.new_empty(..., nope + rope)`, `key[..., :nope].copy_(k_nope)`, `key[..., nope:].copy_(k_rot)`, nothing
    else reading or writing the slices) or as `torch.cat((k_nope, k_rot), -1)`."""
    if getattr(node, "op", None) == "call_function" and node.target is torch.cat and len(node.args[0]) == 2 \
            and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) == -1:
        got = _parts(*node.args[0])
        if got is not None:
            yield got[0], (got[1], got[2]), (node, *got[3])
    if not (getattr(node, "op", None) == "call_method" and node.target == "new_empty" and not node.kwargs):
        return
    slices = [user for user in node.users if user.op == "call_function" and user.target is operator.getitem]
    if len(slices) != 2 or tensor_meta(node) is None:
        return
    kv = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    splits = [u for u in kv.users if u.op == "call_function" and u.target is torch.functional.split] if kv else []
    if len(splits) != 1 or not isinstance(splits[0].args[1], (list, tuple)) or \
            not isinstance(splits[0].args[1][0], int):
        return
    nope = splits[0].args[1][0]
    first = next((c for c in (_slice_copy(s, (Ellipsis, slice(None, nope, None))) for s in slices) if c), None)
    second = next((c for c in (_slice_copy(s, (Ellipsis, slice(nope, None, None))) for s in slices) if c), None)
    if first is None or second is None or tensor_meta(node).dtype != tensor_meta(node.args[0]).dtype:
        return
    got = _parts(first[0], second[0])
    readers = [user for user in node.users if user not in slices]  # the attention: after both writes
    if got is None or got[0] is not kv or not all(_comes_before(c, r) for c in (first[1], second[1]) for r in readers):
        return
    yield got[0], (got[1], got[2]), (node, *slices, first[1], second[1], *got[3])


@structural(_joined_shapes)
def joined_keys(kv, split_sizes, k_pe):
    """The keys [B, H, L, nope + rope]: k_nope of the expansion, then k_pe shared by every head."""
    k_nope = torch.split(kv, split_sizes, dim=-1)[0]
    return torch.cat((k_nope, k_pe.expand(-1, kv.shape[1], -1, -1)), -1)


def _view_shapes(node):
    if getattr(node, "op", None) == "call_method" and node.target == "view" and not node.kwargs and len(node.args) > 1:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        yield node.args[0], (tuple(sizes),), (node,)


@structural(_view_shapes)
def viewed(x, shape):
    """`x.view(shape)`, the sizes given as one tuple or one by one (the view's recorded shape is what is read)."""
    return x.view(shape)


def expanded_mla(latent, weight, shape, split_sizes, k_pe, query, mask, dropout_p, is_causal, scale, enable_gqa):
    """transformers' MLA attention over its expanded cache (`expand_kv`, then SDPA)."""
    kv = torch.transpose(viewed(torch._C._nn.linear(latent, weight, None), shape), -3, -2)
    key = joined_keys(kv, split_sizes, k_pe)
    value = torch.split(kv, split_sizes, dim=-1)[1]
    return F.scaled_dot_product_attention(query, key, value, mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _view_shape(m) -> tuple | None:
    view = next((n for n in m.nodes if n.op == "call_method" and n.target == "view"), None)
    return _shape(view)


def _dims(m) -> dict | None:
    """The site's sizes (b, heads, new tokens, context, latent, rope, nope, v) when every value has the shape
    the absorbed form reads, else None."""
    latent, weight, k_pe, query = (_shape(m.bindings[n]) for n in ("latent", "weight", "k_pe", "query"))
    split_sizes = m.bindings["split_sizes"]
    if any(s is None for s in (latent, weight, k_pe, query)) or not isinstance(split_sizes, (list, tuple)) \
            or len(split_sizes) != 2 or not all(isinstance(x, int) for x in split_sizes):
        return None
    if len(latent) != 4 or len(weight) != 2 or len(k_pe) != 4 or len(query) != 4:
        return None
    (b, _, length, rank), (nope, v), heads = latent, split_sizes, weight[0] // (sum(split_sizes) or 1)
    rope = k_pe[-1]
    wanted = {"latent": (latent, (b, 1, length, rank)), "weight": (weight, (heads * (nope + v), rank)),
              "view": (_view_shape(m), (b, length, heads, nope + v)), "k_pe": (k_pe, (b, 1, length, rope)),
              "query": (query, (b, heads, query[2], nope + rope))}
    if not all(_same_shape(have, want) for have, want in wanted.values()):
        return None
    return dict(b=b, heads=heads, new_tokens=query[2], context=length, latent=rank, rope=rope, nope=nope, v=v)


def _scale(m, dims) -> float | torch.SymFloat | None:
    """The number the attention scales by (a symbolic one, dynamic=True, is given to the op at run time)."""
    scale = m.bindings["scale"]
    return (dims["nope"] + dims["rope"]) ** -0.5 if scale is None else literal(scale, (float,))


def check(m) -> str | None:
    dims = _dims(m)
    if dims is None:
        return ("the expansion's shapes are not kv_b_proj over a latent cache [B, 1, L, R] viewed [B, L, H, nope + v] "
                "and queries [B, H, Lq, nope + rope]")
    if m.bindings["mask"] is not None:
        return ("the attention over the expanded latent takes a mask tensor (several new tokens, a static cache): "
                "the graph rewrite reads no mask yet (fuser.convert does); kept the expanded form")
    if literal(m.bindings["dropout_p"], (float, int)) != 0 or m.bindings["enable_gqa"] is not False:
        return "the attention over the expanded latent has dropout or enable_gqa"
    if m.bindings["is_causal"] is not False or not known_equal(dims["new_tokens"], 1):
        return ("prefill or several new tokens (is_causal, or Lq > 1 with no mask): the expanded form on "
                "fuser::attention is the cheaper one there")
    if not isinstance(_scale(m, dims), (float, torch.SymFloat)):
        return "the attention's scale is not a number"
    dtypes = {tensor_meta(m.bindings[n]).dtype for n in ("latent", "weight", "k_pe", "query")}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (*KERNEL_DTYPES, torch.float64):
        return f"the latent, weight, k_pe and queries are in {', '.join(sorted(map(dtype_name, dtypes)))}"
    cheaper = latent_is_cheaper(1, dims["context"], dims["latent"], dims["rope"], dims["nope"], dims["v"])
    if not known_true(cheaper):
        return "the absorbed form is not cheaper than the expanded one for every context length this graph runs"
    return None


def replace(m):
    dims = _dims(m)
    heads, nope, latent = dims["heads"], dims["nope"], dims["latent"]
    per_head = m["weight"].view(heads, nope + dims["v"], latent)
    query = m["query"]
    q_lat = torch.einsum("bhtd,hdr->bthr", query[..., :nope], per_head[:, :nope])
    scale = _scale(m, dims)
    scale = float(scale) if isinstance(scale, float) else m["scale"]
    o_lat = torch.ops.fuser.mla_decode(q_lat, query[..., nope:].transpose(1, 2), m["latent"][:, 0], m["k_pe"][:, 0],
                                       scale)
    return torch.einsum("bthr,hvr->bhtv", o_lat, per_head[:, nope:]).contiguous()


def describe(m) -> str:
    dims = _dims(m)
    return (f"decode in the latent space: {dims['heads']} heads, latent {dims['latent']}, rope {dims['rope']}, "
            f"{dtype_name(m.meta('query').dtype)}")


@st.composite
def mla_decode_arguments(draw, dtype: torch.dtype | None = None, max_context: int = 150, max_new_tokens: int = 5,
                         max_heads: int = 6, max_latent: int = 72, max_rope: int = 24):
    """(q_lat, q_pe, c, k_pe, scale): contexts from 1 to past several blocks and splits (rarely a multiple of
    any), 1 to a few new tokens (decode, speculative or chunked decode), head counts, latent and rotary
    widths that are no power of two, batch 1 or 2, every layout (the cache's transposed and sliced views
    included: transformers' cache is [B, 1, Lctx, R] viewed)."""
    dtype = dtype or draw(st.sampled_from(KERNEL_DTYPES))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, max_heads))
    new_tokens = draw(st.integers(1, max_new_tokens))
    context = draw(st.integers(new_tokens, max(new_tokens, max_context)))
    latent, rope = draw(sizes(max_latent)), draw(sizes(max_rope))
    q_lat = draw(tensors((batch, new_tokens, heads, latent), dtype))
    q_pe = draw(tensors((batch, new_tokens, heads, rope), dtype))
    c = draw(tensors((batch, context, latent), dtype))
    k_pe = draw(tensors((batch, context, rope), dtype))
    return q_lat, q_pe, c, k_pe, (latent + rope) ** -0.5


@st.composite
def _decode_steps(draw) -> Example:
    """One decode step's expansion and attention at drawn MLA shapes (a latent wider than nope + v is what
    makes absorbing cheaper), the cache's latent and k_pe in any layout."""
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    batch, heads, context = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(2, 40))
    nope, v, rope = draw(st.integers(2, 12)), draw(st.integers(2, 12)), draw(sizes(10))  # nope + v ≥ 4: cheaper
    latent = draw(st.integers(nope + v, 48))
    kwargs = {"latent": draw(tensors((batch, 1, context, latent), dtype)),
              "weight": draw(tensors((heads * (nope + v), latent), dtype, scale=latent ** -0.5)),
              "shape": (batch, context, -1, nope + v), "split_sizes": [nope, v],
              "k_pe": draw(tensors((batch, 1, context, rope), dtype)),
              "query": draw(tensors((batch, heads, 1, nope + rope), dtype)), "mask": None, "dropout_p": 0.0,
              "is_causal": False, "scale": draw(st.sampled_from([None, 0.3])), "enable_gqa": False}
    return Example(expanded_mla, kwargs)


# anchored on the split of the expansion, not on SDPA: an attention whose keys are no expanded latent is
# turned down before the walk reaches a split, so that other models' attention gets no near miss from here
LATENT_ATTENTION = Pattern("latent_attention", (Search(expanded_mla, _decode_steps),), check, replace, describe,
                           anchors=(torch.functional.split,))
