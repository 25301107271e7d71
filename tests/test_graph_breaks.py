"""`fuser.explain` reports Dynamo's graph breaks, which hide code from every pattern: where (module and line),
Dynamo's reason, and what `fuser.convert` runs for the module instead where a module-level converter takes it."""
import inspect

import torch
from torch import nn

import fuser
from test_moe import LoopMoE, LoopMoEModel


def _line_of(cls, text: str) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_a_loop_moe_dynamo_skips_is_reported_with_what_convert_does_instead():
    model = LoopMoEModel()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        report = fuser.explain(model, x)
    assert "moe" not in report.counts(), report
    (brk,) = report.graph_breaks
    assert brk.where.module == "blocks.0, blocks.1", brk
    assert brk.where.location.endswith(f"test_moe.py:{_line_of(LoopMoE, 'torch.where(expert_mask[i])')}"), brk
    assert "nonzero" in brk.reason and brk.skipped, brk
    assert brk.convert.startswith("fuser.convert(model) fuses it: fuser::moe_experts (6 experts, top-2"), brk
    assert "graph breaks (code Dynamo did not hand to fuser)" in str(report)
    with torch.no_grad():  # explained again, told again (Dynamo logs a place once per process otherwise)
        assert len(fuser.explain(model, x).graph_breaks) == 1


class PrintingAttention(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.25
        print("scores", tuple(scores.shape))
        return torch.softmax(scores, -1) @ v


def test_a_graph_break_inside_attention_is_reported_without_a_convert_remedy():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    report = fuser.explain(PrintingAttention(), q, k, v)
    assert "attention" not in report.counts(), report
    (brk,) = report.graph_breaks
    assert brk.where.module == "" and brk.where.location.endswith(f":{_line_of(PrintingAttention, 'print(')}"), brk
    assert "print" in brk.reason.lower() and not brk.skipped and brk.convert == "", brk
