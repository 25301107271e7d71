"""Convert a model written with torch.nn alone (no transformers) to fuser's kernels, without torch.compile.

    python examples/convert_a_plain_model.py

Given a call of the model, `fuser.convert(model, ids)` records what each module receives, captures
the forward of each module that holds a pattern (here a hand-written attention with an additive
mask and an RMSNorm in fp32 with a `gain`), rewrites it into fused ops, checks it against its
original code in float64 (gradients included) and switches the module to it. The parameters stay
where they are; a call unlike the recorded one (another dtype, say) runs the module's own code.
"""
import copy

import torch
from torch import nn

import fuser


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * rms).type_as(x) * self.gain


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x, mask):
        batch, length, dim = x.shape
        q, k, v = (p(x).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale + mask
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim))


class Decoder(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, layers=1):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(layers))
        self.attentions = nn.ModuleList(SelfAttention(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        length = ids.shape[1]
        mask = torch.full((1, 1, length, length), float("-inf"), device=ids.device).triu(1)  # [batch, heads, q, k]
        x = self.embed(ids)
        for norm, attention in zip(self.norms, self.attentions):
            x = x + attention(norm(x), mask)
        return self.head(x)


torch.manual_seed(0)
model = Decoder().eval()
reference = copy.deepcopy(model).double()
ids = torch.randint(0, 64, (2, 9))

print(fuser.convert(model, ids, dry_run=True))  # what would change, and what would not (and why)
weights = {name: p.data_ptr() for name, p in model.state_dict().items()}
fuser.convert(model, ids)
assert {name: p.data_ptr() for name, p in model.state_dict().items()} == weights

other = torch.randint(0, 64, (3, 5))  # another batch and length: the rewritten graphs have symbolic sizes
with torch.profiler.profile() as profile:
    logits = model(other)
print("fused ops run:", sorted({e.name for e in profile.events() if e.name.startswith("fuser::")}))
expected = reference(other)
error = ((logits.double() - expected).norm() / expected.norm()).item()
print(f"logits against float64: relative error {error:.1e}")
assert error < 1e-5
logits.sum().backward()  # the fused ops have their own backward
print("plain model converted: same weights, logits within the float64 contract, gradients flow")
