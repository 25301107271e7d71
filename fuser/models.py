"""Tiny transformers models built from their configs (no hub): for the demo, the CLI and the tests.

Each entry keeps the architecture's real code paths (GQA, sliding window, q/k norms, MoE
routers, MLA) at sizes a CPU runs in milliseconds.
"""
from __future__ import annotations

from typing import Any

import torch

MAX_LENGTH = 128  # the positions every tiny model embeds: the longest input it takes

_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=MAX_LENGTH, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(sliding_window=5),
    "qwen2": {},
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96, head_dim=16,
                        interleave_moe_layer_step=1),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1),
    "gemma": dict(head_dim=16),
    "olmo2": {},
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_LENGTH),
    "bert": dict(num_key_value_heads=None),
}


def tiny_config(arch: str, layers: int = 2, attn_implementation: str = "eager", **overrides: Any):
    """The config of a tiny `arch` model; `overrides` win over the defaults."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    settings = {**_COMMON, "num_hidden_layers": layers, **ARCHITECTURES[arch], **overrides}
    settings = {k: v for k, v in settings.items() if v is not None}
    config = AutoConfig.for_model(arch, **settings)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(arch: str, layers: int = 2, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32,
               seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialized tiny `arch` model (causal LM, or masked LM for encoders), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = tiny_config(arch, layers, attn_implementation, **overrides)
    torch.manual_seed(seed)
    factory = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    return factory.from_config(config).to(dtype).eval()


def tiny_gpt_oss(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny GPT-OSS, in eval mode with eager attention. Not among ARCHITECTURES: its attention layers hand
    their attention function sinks (`s_aux`, one learned logit per head that joins each softmax's denominator),
    which fuser::attention does not implement; drawn here to weigh (about half a row's mass)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**{**_COMMON, "intermediate_size": 32}, num_hidden_layers=layers, head_dim=16,
                          num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def tiny_t5(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny T5 (encoder-decoder, eager attention, no dropout), in eval mode. Not among ARCHITECTURES (no causal
    LM): its attention adds a relative position bias from an embedding (learned: it takes a gradient in
    training) and the masks, to unscaled scores."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=_COMMON["vocab_size"], d_model=32, d_kv=8, d_ff=64, num_layers=layers,
                      num_decoder_layers=layers, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def tiny_fsmt(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny FSMT (fairseq's translation model: encoder-decoder over batched heads [B·H, L, D], eager, no
    dropout), in eval mode. Not among ARCHITECTURES (no causal LM). Its decoder's self-attention in training
    (use_cache off) has two mask terms: an added causal mask (finfo.min above the diagonal), then the padding
    masked_fill; with use_cache on (its eval default) the decoder adds no causal mask at all."""
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    config = FSMTConfig(langs=["en", "de"], src_vocab_size=_COMMON["vocab_size"], tgt_vocab_size=_COMMON["vocab_size"],
                        d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=MAX_LENGTH,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(seed)
    return FSMTForConditionalGeneration(config).eval()


def tiny_inputs(model: torch.nn.Module, batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    """Random token ids for `model`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
