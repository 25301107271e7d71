"""transformers' multi-head latent attention (DeepSeek-V2/V3 and models built on them) decoding in the latent space.

What transformers caches (read in 5.24's `DeepseekV3Attention.forward`; the issue read the same in 5.17): the
latent itself — kv_nope = kv_a_layernorm(kv_a_proj_with_mqa(x)[..., :kv_lora_rank]) as [B, 1, L, kv_lora_rank]
and the rotated k_rot [B, 1, L, rope] — through `cache.update(kv_nope, k_rot, layer_idx)`. Then, at every step,
it expands the *whole* cached latent through kv_b_proj (`expand_kv`) into per-head keys [B, H, L, nope + rope]
and values [B, H, L, v] and runs its attention function: per new token, work and traffic ∝ L·H·(nope + v).
(Older transformers, 4.5x, cached the expanded keys and values instead; such a cache is turned down below.)

`convert_latent_attention` makes each such layer a `Fused<class>` (`fuser.modules.swap`: same parameters, same
state_dict, same cache contents) whose decode steps — Lq ≥ 1 new tokens after a context already in
transformers' dynamic or static cache, causal bottom-right among themselves (a mask of None for one token, or
one read on the host once per forward and proven to be exactly that: `_mask_context`), no dropout, and
cheaper absorbed than expanded (`latent_is_cheaper`) — run the absorbed form: q_lat = q_nope·W_UK and
o = o_lat·W_UVᵀ per head, W_UK and W_UV read from kv_b_proj's weight, and `fuser::mla_decode` attends over the
cached latent [c, k_pe] directly (a static cache's first L slots, L read from the mask). Every other call
(prefill, padding, other masks, other caches) runs the layer's own forward, so prefill keeps the expanded form
on the model's attention implementation (`fuser::attention` once convert switched it). A layer switches after
its decode steps (one token, two, and one on a static cache), on a cache its own prefill filled, agree with
its own forward run in float64.
"""
from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any

import torch
from torch import nn

from fuser.kernels.mla_decode import latent_is_cheaper
from fuser.modules.converters import source_line
from fuser.modules.swap import FusedModule, install
from fuser.numerics.contract import judge
from fuser.report import MatchRecord, NearMiss, Report, Where

PATTERN = "latent_attention"
OP = "fuser::mla_decode"
ATTRIBUTES = ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj", "num_heads", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "scaling", "layer_idx", "q_lora_rank")
CACHE_NAMES = ("cache", "past_key_values", "past_key_value")  # 5.24 / earlier spellings of the cache argument
# keyword arguments a decoder layer passes that change nothing here (positions are in position_embeddings)
WITHOUT_EFFECT = ("position_ids", "cache_position", "use_cache", "output_attentions")
ROPE = {True: "apply_rotary_pos_emb_interleave", False: "apply_rotary_pos_emb"}


def is_latent_attention(module: nn.Module) -> bool:
    """An MLA layer, not yet converted: DeepSeek's attributes and a forward computing from them."""
    return (not isinstance(module, FusedModule) and all(hasattr(module, name) for name in ATTRIBUTES)
            and isinstance(module.kv_b_proj, nn.Linear))


def _rope(module: nn.Module):
    """The rotary function the layer's forward applies (its module's own)."""
    interleave = bool(getattr(module.config, "rope_interleave", False))
    return inspect.unwrap(type(module).forward).__globals__.get(ROPE[interleave])


class LatentDecode:
    """The fused call of one MLA layer: its decode steps in the latent space (see the module docstring)."""

    def __init__(self, module: nn.Module):
        forward = inspect.signature(inspect.unwrap(type(module).forward))
        self.names = [n for n, p in forward.parameters.items() if n != "self" and p.kind in
                      (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.rope = _rope(module)
        self.cache_name = next((n for n in CACHE_NAMES if n in forward.parameters), CACHE_NAMES[0])

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        arguments = {**dict(zip(self.names, args)), **kwargs}
        cache = next((arguments.pop(n) for n in CACHE_NAMES if n in arguments and arguments[n] is not None), None)
        for name in CACHE_NAMES:
            arguments.pop(name, None)
        arguments["cache"] = cache
        return arguments

    def context(self, module: nn.Module, args: tuple, kwargs: dict) -> int | None:
        """How many cached keys (the new tokens' included) this call's new tokens attend, when it is one the
        latent decode takes: transformers' dynamic or static cache layer already holding the layer's latent,
        no argument that changes the result beyond the mask, a mask that is None with one new token (every
        cached key) or causal bottom-right over the cache's first L keys (`_mask_context`), and a step cheaper
        absorbed than expanded (`latent_is_cheaper`: prefill stays expanded). None otherwise."""
        arguments = self._arguments(args, kwargs)
        hidden, cache, mask = arguments.get("hidden_states"), arguments["cache"], arguments.get("attention_mask")
        extra = [k for k, v in arguments.items() if v is not None and v is not False and k not in WITHOUT_EFFECT
                 and k not in ("hidden_states", "position_embeddings", "attention_mask", "cache")]
        if (extra or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] < 1
                or arguments.get("position_embeddings") is None
                or (module.training and module.attention_dropout > 0) or cache is None):
            return None
        new_tokens, keys = hidden.shape[1], _keys_after_update(cache, module, hidden)
        if keys is None:
            return None
        if mask is None:
            context = keys if new_tokens == 1 else None  # None with several tokens: each implementation its own
        elif isinstance(mask, torch.Tensor):
            context = _mask_context(mask, new_tokens, keys)
        else:
            return None
        latent_wins = context is not None and latent_is_cheaper(
            new_tokens, context, module.kv_lora_rank, module.qk_rope_head_dim, module.qk_nope_head_dim,
            module.v_head_dim)
        return context if latent_wins and context > new_tokens else None

    def accepts(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return self.context(module, args, kwargs) is not None

    def absorbed_weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, R], W_UV [H, v, R]) from kv_b_proj's weight: views where a gradient is recorded,
        else contiguous copies kept until the weight changes (keyed on its storage, version, dtype, device)."""
        weight = module.kv_b_proj.weight
        heads, nope = module.num_heads, module.qk_nope_head_dim
        per_head = weight.view(heads, nope + module.v_head_dim, weight.shape[-1])
        if torch.is_grad_enabled() and weight.requires_grad:
            return per_head[:, :nope], per_head[:, nope:]
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        kept = getattr(module, "_fuser_absorbed", None)
        if kept is None or kept[0] != key:
            kept = (key, per_head[:, :nope].detach().contiguous(), per_head[:, nope:].detach().contiguous())
            module._fuser_absorbed = kept
        return kept[1], kept[2]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None]:
        context = self.context(module, args, kwargs)  # the mask's verdict is kept: no second host read
        arguments = self._arguments(args, kwargs)
        hidden, (cos, sin), cache = arguments["hidden_states"], arguments["position_embeddings"], arguments["cache"]
        batch, length = hidden.shape[:2]
        heads, nope, rope, latent = (module.num_heads, module.qk_nope_head_dim, module.qk_rope_head_dim,
                                     module.kv_lora_rank)
        if module.q_lora_rank is None:
            q = module.q_proj(hidden)
        else:
            q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden)))
        q_nope, q_rot = torch.split(q.view(batch, length, heads, nope + rope).transpose(1, 2), [nope, rope], dim=-1)
        kv_nope, k_rot = torch.split(module.kv_a_proj_with_mqa(hidden), [latent, rope], dim=-1)
        kv_nope = module.kv_a_layernorm(kv_nope).view(batch, 1, length, latent)
        q_rot, k_rot = self.rope(q_rot, k_rot.view(batch, 1, length, rope), cos, sin)
        c, k_pe = cache.update(kv_nope, k_rot, module.layer_idx)
        w_uk, w_uv = self.absorbed_weights(module)
        q_lat = torch.einsum("bhtd,hdr->bthr", q_nope, w_uk)
        o_lat = torch.ops.fuser.mla_decode(q_lat, q_rot.transpose(1, 2), c[:, 0, :context], k_pe[:, 0, :context],
                                           float(module.scaling))
        out = torch.einsum("bthr,hvr->bthv", o_lat, w_uv).reshape(batch, length, heads * module.v_head_dim)
        return module.o_proj(out), None


def _keys_after_update(cache, module: nn.Module, hidden: torch.Tensor) -> int | None:
    """How many keys `cache.update` will hand back for this layer, read on the host: a `DynamicLayer` holding
    context (its length plus the new tokens), or an initialized `StaticLayer` (its whole buffer: transformers
    5.17 and 5.24 keep the latent [B, 1, max_cache_len, R] there, as the dynamic layer does, and mask the
    slots not yet written). None for any other cache, or one whose layer holds something else."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    layers = getattr(cache, "layers", ())
    layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
    if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
        keys = layer.get_seq_length() + hidden.shape[1]
    elif type(layer) is StaticLayer and layer.is_initialized:
        keys = layer.keys.shape[-2]
    else:
        return None
    latent = [hidden.shape[0], 1, layer.keys.shape[-2], module.kv_lora_rank]
    rope = [hidden.shape[0], 1, layer.keys.shape[-2], module.qk_rope_head_dim]
    return keys if [list(layer.keys.shape), list(layer.values.shape)] == [latent, rope] else None


_MASK_VERDICTS: dict[int, tuple] = {}  # id(mask) -> (weak reference, version, new tokens, keys, context)


def _mask_context(mask: torch.Tensor, new_tokens: int, keys: int) -> int | None:
    """L such that `mask`, cut to the `keys` cached keys as transformers' attention functions cut it, lets new
    token t of Lq see exactly keys j ≤ L − Lq + t in every sequence and head; None for any other mask (padding
    among them). Read as transformers writes masks: bool, True = attend (SDPA's, fuser's), or additive float,
    0 = attend and −inf or the dtype's lowest elsewhere (eager's: a finite score plus the lowest value gives
    exactly zero probability). One host read per mask tensor (transformers builds one per forward and hands it
    to every layer), kept while the same tensor is unchanged (its version)."""
    kept = _MASK_VERDICTS.get(id(mask))
    if kept is not None and kept[0]() is mask and kept[1:4] == (mask._version, new_tokens, keys):
        return kept[4]
    if mask.dim() != 4 or mask.shape[-2] != new_tokens or mask.shape[-1] < keys or mask.numel() == 0:
        return None
    cut = mask[..., :keys]
    if cut.dtype == torch.bool:
        seen, readable = cut, torch.ones((), dtype=torch.bool, device=cut.device)
    elif cut.dtype.is_floating_point:
        seen = cut == 0
        readable = (seen | (cut == float("-inf")) | (cut == torch.finfo(cut.dtype).min)).all()
    else:
        return None
    context = seen[0, 0, -1].sum()  # the last new token of the first sequence sees L keys
    last = context - new_tokens + torch.arange(new_tokens, device=cut.device)
    causal = torch.arange(keys, device=cut.device)[None, :] <= last[:, None]
    proven, context = torch.stack([(readable & (seen == causal).all()).long(), context]).tolist()
    context = context if proven and context >= new_tokens else None
    if len(_MASK_VERDICTS) > 16:
        _MASK_VERDICTS.clear()
    _MASK_VERDICTS[id(mask)] = (weakref.ref(mask), mask._version, new_tokens, keys, context)
    return context


# ---------------------------------------------------------------------------------------------
# The check: a decode step on the layer's own prefilled cache, against its own forward in float64
# ---------------------------------------------------------------------------------------------

def _rotary(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def _cache_in(cache, dtype: torch.dtype):
    """A copy of a cache with every layer's tensors in `dtype`."""
    copied = copy.deepcopy(cache)
    for layer in copied.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            if hasattr(layer, "dtype"):
                layer.dtype = dtype
    return copied


def _steps(model: nn.Module, layer: nn.Module, dynamic, hidden: torch.Tensor, context: int):
    """The steps the check runs after a prefill of `context` tokens, as (name, cache, new tokens, mask): one
    new token on the dynamic cache (no mask), two (a bottom-right causal mask), one on a static cache holding
    the same context with three slots to spare (the mask hides them); masks as the layer's attention function
    reads them (eager's additive float, SDPA's bool otherwise)."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=context + 4)
    stored = dynamic.layers[layer.layer_idx]
    static.update(stored.keys, stored.values, layer.layer_idx)
    keys = torch.arange(context + 4, device=hidden.device)
    two = keys[None, :context + 2] <= torch.arange(context, context + 2, device=hidden.device)[:, None]
    masks = [two[None, None].expand(2, 1, 2, -1), (keys <= context)[None, None, None].expand(2, 1, 1, -1)]
    if model.config._attn_implementation == "eager":
        lowest = torch.finfo(hidden.dtype).min
        masks = [torch.zeros(m.shape, dtype=hidden.dtype, device=m.device).masked_fill(~m, lowest) for m in masks]
    return [("one new token", dynamic, 1, None), ("two new tokens", dynamic, 2, masks[0]),
            ("a static cache", static, 1, masks[1])]


def layer_problem(model: nn.Module, layer: nn.Module, call: LatentDecode, context: int = 20) -> str | None:
    """Why `layer` cannot decode in the latent space, or None: its structure, what its prefill caches, and its
    decode steps (`_steps`, 2 sequences) against its own forward in float64 (outputs, and the cache left the
    same)."""
    from transformers import DynamicCache

    rotary = _rotary(model)
    if rotary is None:
        return "the model has no rotary embedding module to give the layer its positions"
    if call.rope is None:
        return f"its forward's module has no {ROPE[bool(getattr(layer.config, 'rope_interleave', False))]}"
    if layer.kv_b_proj.bias is not None:
        return "its kv_b_proj has a bias (the absorbed form folds a bias-free W_UK and W_UV)"
    parameter = next(layer.parameters())
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, context + 2, layer.config.hidden_size, generator=generator).to(parameter)
    positions = torch.arange(context + 2, device=parameter.device)[None].expand(2, -1)
    cos, sin = rotary(hidden, positions)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            layer(hidden[:, :context], (cos[:, :context], sin[:, :context]), None, **{call.cache_name: cache})
    except Exception as error:
        return f"its forward could not be run on random hidden states with a cache ({type(error).__name__}: {error})"
    stored = cache.layers[layer.layer_idx]
    expected = ([2, 1, context, layer.kv_lora_rank], [2, 1, context, layer.qk_rope_head_dim])
    if [list(stored.keys.shape), list(stored.values.shape)] != [*expected]:
        return (f"its cache holds keys {list(stored.keys.shape)} and values {list(stored.values.shape)}, not the "
                f"latent {expected[0]} and rotary key {expected[1]} (this transformers caches expanded keys)")
    for name, filled, new, mask in _steps(model, layer, cache, hidden, context):
        new_tokens = slice(context, context + new)
        step = (hidden[:, new_tokens], (cos[:, new_tokens], sin[:, new_tokens]), mask)
        theirs_cache, ours_cache, cache64 = (_cache_in(filled, hidden.dtype), _cache_in(filled, hidden.dtype),
                                             _cache_in(filled, torch.float64))
        with torch.no_grad():
            if not call.accepts(layer, step, {"cache": ours_cache}):
                return f"its decode step with {name} is not one the latent decode takes"
            ours = call(layer, step, {"cache": ours_cache})[0]
            theirs = layer(*step, **{call.cache_name: theirs_cache})[0]
            step64 = (step[0].double(), (step[1][0].double(), step[1][1].double()), mask)
            reference = copy.deepcopy(layer).double()(*step64, **{call.cache_name: cache64})[0]
        verdict = judge(ours, reference, own=theirs)
        if verdict.problem is not None:
            return f"its decode step with {name} in the latent space: {verdict.problem}; kept the original"
        mine, own = ours_cache.layers[layer.layer_idx], theirs_cache.layers[layer.layer_idx]
        if not (torch.equal(mine.keys, own.keys) and torch.equal(mine.values, own.values)):
            return f"its decode step with {name} left other cache contents than the layer's own; kept the original"
    return None


def convert_latent_attention(model: nn.Module, report: Report, dry_run: bool = False) -> None:
    """Switch each MLA layer of `model` whose decode step passes the check (`layer_problem`) to `LatentDecode`
    (unless `dry_run`), recording a match or a near miss per layer in `report`. Run after `convert_attention`:
    a switched layer's forward is `FusedModule`'s, which transformers' attention lookup no longer shows."""
    for name, layer in list(model.named_modules()):
        if not is_latent_attention(layer):
            continue
        site = Where(name, source_line(layer))
        call = LatentDecode(layer)
        problem = layer_problem(model, layer, call)
        if problem is not None:
            report.near_misses.append(NearMiss(PATTERN, site, problem))
            continue
        report.matches.append(MatchRecord(PATTERN, site, OP, "decode steps in the latent space (new tokens "
                                          "after a context, causal bottom-right; dynamic or static cache); "
                                          "prefill expanded as before", ()))
        if not dry_run:
            install(layer, call)
