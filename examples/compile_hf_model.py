"""Compile a Hugging Face model with backend="fuser" and see what was rewritten.

    python examples/compile_hf_model.py

A small Llama is built from its config so the example needs no download; with a real
checkpoint use `AutoModelForCausalLM.from_pretrained(name)` instead. On a GPU the fused ops
run Triton kernels; on a CPU they run their plain-torch reference (or the real kernels
through the Triton interpreter when TRITON_INTERPRET=1).
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fuser

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
input_ids = torch.randint(0, config.vocab_size, (2, 12))

compiled = torch.compile(model, backend="fuser", options={"codegen": "eager"})  # or Inductor, the default
with torch.no_grad():
    logits = compiled(input_ids).logits
    expected = model(input_ids).logits

print(fuser.last_report())  # every rewrite: pattern, module, file:line, op, kernel mode
print("rewrites:", fuser.last_report().counts())
error = ((logits - expected).norm() / expected.norm()).item()
print(f"relative difference from the uncompiled model: {error:.1e}")
assert fuser.last_report().counts() == {"attention": 2, "rms_norm": 5} and error < 1e-5
