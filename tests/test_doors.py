"""One answer from every door: explain, torch.compile, fuzz(model) and convert decide each site the same way
for the same model and grad state (they share the engine's plan and one numerics contract)."""
import torch
from torch import nn

import fuser
from helpers import compile_and_run


class BiasedAttention(nn.Module):
    """T5-style: a learned relative-position bias added to the scores (it takes a gradient in training)."""

    def __init__(self, dim=16, heads=2, length=6):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)
        self.bias = nn.Embedding(2 * length, heads)
        self.register_buffer("relative", torch.arange(length)[None, :] - torch.arange(length)[:, None] + length)

    def forward(self, x):
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias(self.relative[:length, :length]).permute(2, 0, 1)[None]
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        return torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, length, dim)


def _attention_decisions(report):
    return report.counts().get("attention", 0), [n.reason for n in report.near_misses if n.pattern == "attention"]


def test_every_door_rewrites_a_learned_bias_in_training_and_without_gradients():
    """The bias takes its gradient from the kernel (read as a tensor): explain, torch.compile, convert and fuzz
    all rewrite the site, in training and under no_grad."""
    torch.manual_seed(0)
    model, x = BiasedAttention(), torch.randn(2, 6, 16)
    explained = _attention_decisions(fuser.explain(model, x))
    _, compiled_report = compile_and_run(model, x)
    compiled = _attention_decisions(compiled_report)
    converted = _attention_decisions(fuser.convert(model, x, dry_run=True))
    assert explained == compiled == converted == (1, []), (explained, compiled, converted)
    result = fuser.fuzz(model, x, max_examples=2, seed=0)
    assert result.ok and any(site.startswith("attention") for site in result.sites), result

    with torch.no_grad():
        explained = _attention_decisions(fuser.explain(model, x))
        _, compiled_report = compile_and_run(model, x)
    assert explained[0] == _attention_decisions(compiled_report)[0] == 1
