"""transformers' multi-head latent attention (DeepSeek-V2/V3 and models built on them) decoding in the latent space.

What transformers caches (read in 5.24's `DeepseekV3Attention.forward`; the issue read the same in 5.17): the
latent itself — kv_nope = kv_a_layernorm(kv_a_proj_with_mqa(x)[..., :kv_lora_rank]) as [B, 1, L, kv_lora_rank]
and the rotated k_rot [B, 1, L, rope] — through `cache.update(kv_nope, k_rot, layer_idx)`. Then, at every step,
it expands the *whole* cached latent through kv_b_proj (`expand_kv`) into per-head keys [B, H, L, nope + rope]
and values [B, H, L, v] and runs its attention function: per new token, work and traffic ∝ L·H·(nope + v).
(Older transformers, 4.5x, cached the expanded keys and values instead; such a cache is turned down below.)

`convert_latent_attention` makes each such layer a `Fused<class>` (`fuser.modules.swap`: same parameters, same
state_dict, same cache contents) whose decode steps — one new token, transformers' dynamic cache already
holding the context, no mask tensor (SDPA's and fuser's masks are None there without padding), no dropout —
run the absorbed form: q_lat = q_nope·W_UK and o = o_lat·W_UVᵀ per head, W_UK and W_UV read from kv_b_proj's
weight, and `fuser::mla_decode` attends over the cached latent [c, k_pe] directly. Every other call (prefill,
masks, static caches, several new tokens) runs the layer's own forward, so prefill keeps the expanded form on
the model's attention implementation (`fuser::attention` once convert switched it). A layer switches after its
decode step, on a cache its own prefill filled, agrees with its own forward run in float64.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

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

    def accepts(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        from transformers.cache_utils import DynamicLayer

        arguments = self._arguments(args, kwargs)
        hidden, cache = arguments.get("hidden_states"), arguments["cache"]
        extra = [k for k, v in arguments.items() if v is not None and v is not False and k not in WITHOUT_EFFECT
                 and k not in ("hidden_states", "position_embeddings", "attention_mask", "cache")]
        if (extra or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != 1
                or arguments.get("attention_mask") is not None or arguments.get("position_embeddings") is None
                or (module.training and module.attention_dropout > 0) or cache is None):
            return False
        layers = getattr(cache, "layers", ())
        layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
        return type(layer) is DynamicLayer and layer.get_seq_length() > 0

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
        o_lat = torch.ops.fuser.mla_decode(q_lat, q_rot.transpose(1, 2), c[:, 0], k_pe[:, 0], float(module.scaling))
        out = torch.einsum("bthr,hvr->bthv", o_lat, w_uv).reshape(batch, length, heads * module.v_head_dim)
        return module.o_proj(out), None


# ---------------------------------------------------------------------------------------------
# The check: a decode step on the layer's own prefilled cache, against its own forward in float64
# ---------------------------------------------------------------------------------------------

def _rotary(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def _cache_in(cache, dtype: torch.dtype):
    """A copy of a dynamic cache with every layer's tensors in `dtype`."""
    copied = copy.deepcopy(cache)
    for layer in copied.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            if hasattr(layer, "dtype"):
                layer.dtype = dtype
    return copied


def layer_problem(model: nn.Module, layer: nn.Module, call: LatentDecode, context: int = 20) -> str | None:
    """Why `layer` cannot decode in the latent space, or None: its structure, what its prefill caches, and one
    decode step (2 sequences) against its own forward in float64 (outputs, and the cache left the same)."""
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
    hidden = torch.randn(2, context + 1, layer.config.hidden_size, generator=generator).to(parameter)
    positions = torch.arange(context + 1, device=parameter.device)[None].expand(2, -1)
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
    step = (hidden[:, context:], (cos[:, context:], sin[:, context:]), None)
    theirs_cache, ours_cache, cache64 = _cache_in(cache, hidden.dtype), _cache_in(cache, hidden.dtype), \
        _cache_in(cache, torch.float64)
    layer64 = copy.deepcopy(layer).double()
    with torch.no_grad():
        if not call.accepts(layer, step, {"cache": ours_cache}):
            return "its decode step is not one the latent decode takes"
        ours = call(layer, step, {"cache": ours_cache})[0]
        theirs = layer(*step, **{call.cache_name: theirs_cache})[0]
        step64 = (step[0].double(), (step[1][0].double(), step[1][1].double()), None)
        reference = layer64(*step64, **{call.cache_name: cache64})[0]
    verdict = judge(ours, reference, own=theirs)
    if verdict.problem is not None:
        return f"its decode step in the latent space: {verdict.problem}; kept the original"
    mine, own = ours_cache.layers[layer.layer_idx], theirs_cache.layers[layer.layer_idx]
    if not (torch.equal(mine.keys, own.keys) and torch.equal(mine.values, own.values)):
        return "its decode step left other cache contents than the layer's own; kept the original"
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
        report.matches.append(MatchRecord(PATTERN, site, OP, "decode steps in the latent space (one new token, a "
                                          "dynamic cache, no mask); prefill expanded as before", ()))
        if not dry_run:
            install(layer, call)
