"""Attention spellings through `torch.compile(backend="fuser")` against the plain 4-D spelling of the same shape.

    python benchmarks/bench_attention_spellings.py [--out DIR]

Spellings: 4-D naive attention (the baseline), batched heads over 3-D tensors (`torch.bmm` on [B·H, L, D]),
batched heads whose scores are viewed per head to add a [B, 1, L, L] mask (GroupViT's spelling, against the
4-D spelling with the same mask), a 0-d temperature tensor (folded into q; learned in forward + backward: its
gradient computed too), and a symbolic scale and eps
(`dynamic=True`, eager codegen so the floats stay symbolic). Each is checked to be one fused attention, then
timed with triton.testing.do_bench (median ms), forward under no_grad and forward + backward; the table gives
each time and its ratio to the baseline (issue 14 asks for these forms within 10% of plain attention).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import pathlib
import sys

import torch
import triton

import fuser

DEVICE, DTYPE = "cuda", torch.bfloat16
SHAPES = [(4, 16, 1024, 64), (2, 32, 2048, 128)]  # B, H, L, D


def plain(q, k, v, mask, t):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (0 if mask is None else mask), -1) @ v


def batched(q, k, v, mask, t):
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5, -1), v)


def viewed(q, k, v, mask, t):
    n, length, d = q.shape
    b = mask.shape[0]
    scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
    scores = (scores.view(b, n // b, length, length) + mask).view(n, length, length)
    return torch.bmm(torch.softmax(scores, -1), v)


def temperature(q, k, v, mask, t):
    return torch.softmax(q @ k.transpose(-1, -2) * t, -1) @ v


class Symbolic(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scaling = d ** -0.5

    def forward(self, q, k, v, mask, t):
        return torch.softmax(q @ k.transpose(-1, -2) * self.scaling, -1) @ v


def inputs(b, h, length, d, three_d: bool, grad: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (b * h, length, d) if three_d else (b, h, length, d)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(grad) for _ in range(3))
    mask = torch.zeros(b, 1, length, length, device=DEVICE, dtype=DTYPE)
    mask[0, ..., : length // 4] = torch.finfo(DTYPE).min
    return q, k, v, mask, torch.tensor(1 / math.sqrt(d), device=DEVICE, dtype=DTYPE)


def timed(fn, args, backward: bool) -> float:
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(*args))
    grad = torch.randn_like(fn(*args))
    leaves = [a for a in args if a.requires_grad]  # q, k, v (and a learned temperature)
    return triton.testing.do_bench(lambda: torch.autograd.grad(fn(*args), leaves, grad))


def compiled(fn, dynamic=False):
    options = {"codegen": "eager"} if dynamic else {}
    torch._dynamo.reset()
    fuser.reset_reports()
    return torch.compile(fn, backend="fuser", dynamic=dynamic, options=options)


def row(name, fn, args, baseline, backward, dynamic=False):
    run = compiled(fn, dynamic)
    ms = timed(run, args, backward)
    counts = fuser.last_report().counts()
    ok = counts.get("attention") == 1
    return [name, f"{ms:.3f}", f"{baseline / ms:.2f}" if baseline else "1.00", "yes" if ok else f"NO {counts}"], ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    lines = [f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, {DTYPE}"]
    for b, h, length, d in SHAPES:
        for backward in (False, True):
            lines.append(f"\nB{b} H{h} L{length} D{d}, {'forward + backward' if backward else 'forward'}")
            lines.append(f"{'spelling':<32}{'ms':>9}{'baseline/ms':>13}  fused")
            four, three = inputs(b, h, length, d, False, backward), inputs(b, h, length, d, True, backward)
            base_row, base = row("4-D naive", plain, (*four[:3], None, None), None, backward)
            masked_row, masked = row("4-D naive, [B,1,L,L] mask", plain, four, None, backward)
            rows = [base_row, row("bmm, batched heads", batched, three, base, backward)[0], masked_row,
                    row("bmm, scores viewed per head + mask", viewed, three, masked, backward)[0]]
            learned = (*four[:4], four[4].detach().requires_grad_(backward))  # learned in training
            rows.append(row("0-d temperature tensor", temperature, learned, base, backward)[0])
            rows.append(row("symbolic scale (dynamic=True)", Symbolic(d), four, base, backward, dynamic=True)[0])
            lines += [f"{r[0]:<32}{r[1]:>9}{r[2]:>13}  {r[3]}" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_attention_spellings.txt").write_text(text + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
