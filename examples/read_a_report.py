"""Read what fuser would do to a model: matches, near misses and why, graphs, an HTML page.

    python examples/read_a_report.py [report.html]

`fuser.explain` runs the model once under Dynamo and rewrites copies of its graphs, so
nothing is compiled and no kernel runs.
"""
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import fuser

config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
model = Qwen2ForCausalLM(config).eval()
report = fuser.explain(model, torch.randint(0, 128, (1, 10)))

print(report)
for match in report.matches:  # one record per rewritten site
    print(f"{match.id}: {match.pattern} in {match.where.module} at {match.where.location.rsplit('/', 1)[-1]}, "
          f"{len(match.nodes)} nodes -> {match.op} ({match.mode})")
for miss in report.near_misses:  # sites left as they were, with the reason
    print(f"not rewritten: {miss.pattern} in {miss.where.module}: {miss.reason}")

# The graphs before and after, as networkx graphs whose nodes carry op, target, shape, dtype, match.
before, after = report.graph_before, report.graph_after
first = report.matches[0]
replaced = [n for n, data in before.nodes(data=True) if data["match"] == first.id]
fused = [data["target"] for _, data in after.nodes(data=True) if data["match"] == first.id]
print(f"{first.id} replaced {len(replaced)} nodes by {fused}; the graph went from {len(before)} to {len(after)} nodes")

path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "report.html"
report.save_html(path)  # one page, no network: the tables and before/after pictures of each region
print(f"open {path} in a browser")
