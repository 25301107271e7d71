"""Convert a Hugging Face model to fuser's kernels (no torch.compile) and generate text with it.

    python examples/convert_and_generate.py

`fuser.convert(model)` swaps, in place, every module whose forward is one fused op (the
RMSNorms, checked on random inputs first) and routes attention through transformers'
attention interface. The parameters are untouched: the checkpoint saves and loads as before.
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fuser

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
prompt = torch.randint(0, config.vocab_size, (1, 6))
before = model.generate(prompt, max_new_tokens=8, do_sample=False)

print(fuser.convert(model, dry_run=True))  # what would change, and what would not (and why)
fuser.convert(model)
after = model.generate(prompt, max_new_tokens=8, do_sample=False)
print("attention implementation:", model.config._attn_implementation)
print("final norm is now:", model.model.norm)
print("greedy tokens before:", before.tolist(), "\n              after: ", after.tolist())
assert torch.equal(before, after)

with tempfile.TemporaryDirectory() as directory:  # the checkpoint is the original model's
    model.save_pretrained(directory)
    reloaded = LlamaForCausalLM.from_pretrained(directory).eval()
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
assert torch.equal(reloaded.generate(prompt, max_new_tokens=8, do_sample=False), before)
print("save_pretrained / from_pretrained: same weights, same tokens")
