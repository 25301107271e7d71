"""Fuzz a pattern, and a model, against the numerics contract with hypothesis.

    python examples/fuzz_a_pattern.py

`fuser.fuzz("rms_norm")` draws odd shapes, every dtype and strided layouts from the pattern's
own strategy, compiles the naive code through the backend and compares the fused result
(values and gradients) with the naive code run in float64. Given a model and its inputs it
fuzzes every site the backend rewrites there, drawing new inputs for the model.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fuser

result = fuser.fuzz("rms_norm", max_examples=10, seed=0)
print(result)  # ok, examples run, worst relative error of the output and of each gradient
assert result.ok, result.failure  # on failure: the shrunk example and the seed that reproduces it

config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")
model = LlamaForCausalLM(config).eval()
result = fuser.fuzz(model, torch.randint(0, 128, (2, 9)), max_examples=3, seed=0)
print(result)
assert result.ok, result.failure
