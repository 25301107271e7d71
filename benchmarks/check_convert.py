"""`fuser.convert` on the GPU: every tiny architecture (and a GPT-OSS, whose attention takes sinks) in bf16 on
CUDA, converted without example inputs; the report's counts and near misses, and the logits against the same
model in float32 by the numerics contract (the bf16 original's own error as the floor).

    python3 benchmarks/check_convert.py     # prints one line per model; exit status 1 if any fails
"""
import copy
import sys

import torch

import fuser
from fuser.models import ARCHITECTURES, tiny_gpt_oss, tiny_inputs, tiny_model
from fuser.numerics.contract import judge


def main() -> int:
    models = {arch: lambda arch=arch: tiny_model(arch) for arch in ARCHITECTURES}
    models["gpt_oss"] = tiny_gpt_oss
    failed = 0
    for name, build in models.items():
        model = build().cuda()
        ids = tiny_inputs(model, length=37).cuda()
        reference = copy.deepcopy(model).float()
        model.to(torch.bfloat16)
        with torch.no_grad():
            own = model(ids).logits
            report = fuser.convert(model, dry_run=True)
            fuser.convert(model)
            logits, ref = model(ids).logits, reference(ids).logits.double()
        verdict = judge(logits, ref, own=own)
        misses = "; ".join(f"{m.pattern}@{m.where.module}: {m.reason}" for m in report.near_misses[:2])
        sinks_kept = name != "gpt_oss" or model.config._attn_implementation == "eager"
        failed += verdict.problem is not None or not sinks_kept
        print(f"{name:12s} {str(report.counts()):45s} error {verdict.error:.2e} (bound {verdict.bound:.1e}) "
              f"{'ok' if verdict.problem is None and sinks_kept else 'FAILED ' + str(verdict.problem)}"
              f"{'  near misses: ' + misses if misses else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
