"""An SDPA call is rewritten where the kernel is measured faster than SDPA's own backend on the GPU at hand
(kernels/attention/sdpa_speed.py), kept where it is not, and the report says which."""
import pytest
import torch

import fuser
import fuser.patterns.attention as attention_pattern
from fuser.kernels.attention import sdpa_speed
from fuser.models import tiny_inputs, tiny_model
from helpers import float64_reference
from numerics import assert_close


def test_the_table_is_read_by_gpu_head_dim_mask_kind_and_pass(monkeypatch):
    monkeypatch.setattr(sdpa_speed, "_gpu_name", lambda index: "Test GPU")
    monkeypatch.setattr(sdpa_speed, "SPEEDUP_OVER_SDPA", {"Test GPU": {(64, "causal", False): 1.3}})
    cuda = torch.device("cuda", 0)
    assert sdpa_speed.speedup_over_sdpa(cuda, 64, "causal", False) == ("Test GPU", 1.3)
    assert sdpa_speed.speedup_over_sdpa(cuda, 64, "causal", True) is None  # training not measured
    assert sdpa_speed.speedup_over_sdpa(cuda, 128, "causal", False) is None
    assert sdpa_speed.speedup_over_sdpa(cuda, 64, None, False) is None  # a mask kind nothing was measured for
    assert sdpa_speed.speedup_over_sdpa(torch.device("cpu"), 64, "causal", False) is None


def _compiled_llama(monkeypatch, speedup):
    """Tiny Llama under SDPA (is_causal, native GQA: no repeat_kv, no mask), as if measured `speedup`."""
    seen = []

    def measured(device, head_dim, mask_kind, training):
        seen.append((head_dim, mask_kind, training))
        return ("Test GPU", speedup)
    monkeypatch.setattr(attention_pattern, "speedup_over_sdpa", measured)
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = tiny_inputs(model)
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser", options={"codegen": "eager"})(ids).logits
        reference = float64_reference(model)(ids).logits
    assert_close(logits, reference, torch.float32)
    assert {kind for _, kind, _ in seen} == {"causal"} and not any(training for *_, training in seen)
    return fuser.last_report()


def test_sdpa_is_rewritten_where_the_kernel_is_measured_faster(monkeypatch):
    report = _compiled_llama(monkeypatch, 1.3)
    modes = [m.mode for m in report.matches if m.pattern == "attention"]
    assert len(modes) == 2, report
    assert all("SDPA replaced: the kernel measured 1.30x its backend on Test GPU" in mode for mode in modes), modes


@pytest.mark.parametrize("speedup", [0.8, 1.0])
def test_sdpa_is_kept_where_its_backend_is_measured_faster(monkeypatch, speedup):
    report = _compiled_llama(monkeypatch, speedup)
    assert report.counts().get("attention", 0) == 0, report
    reasons = [n.reason for n in report.near_misses if n.pattern == "attention"]
    assert reasons and all("its own backend is faster here" in r and f"{speedup:.2f}x" in r for r in reasons), reasons
