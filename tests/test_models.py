"""Real transformers architectures (tiny configs, no hub) compiled with backend="fuser":
every expected site is rewritten, logits and one training step's gradients meet the
numerics contract against the same model run in float64."""
import pytest
import torch

import fuser
from fuser.models import tiny_inputs, tiny_model
from helpers import float64_reference
from numerics import assert_close

# rms_norm sites per tiny model (2 layers): input + post-attention norms per layer, the final
# norm, plus q/k norms (OLMoE, Qwen3-MoE, Olmo2) and MLA's q_a/kv_a norms (DeepSeek-V3).
EXPECTED_RMS_NORMS = {"llama": 5, "mistral": 5, "qwen2": 5, "olmoe": 9, "mixtral": 5, "deepseek_v3": 9,
                      "qwen3_moe": 9, "gemma": 5, "olmo2": 9}


@pytest.mark.parametrize("arch", EXPECTED_RMS_NORMS)
def test_explain_counts_every_rms_norm(arch):
    model = tiny_model(arch)
    report = fuser.explain(model, tiny_inputs(model))
    assert report.counts().get("rms_norm") == EXPECTED_RMS_NORMS[arch], report
    assert all(m.where.module.endswith("norm") for m in report.matches if m.pattern == "rms_norm"), report


@pytest.mark.parametrize("arch, mode", [("llama", "weight after cast"), ("gemma", "weight in fp32, offset 1"),
                                        ("olmo2", "weight in fp32")])
def test_bfloat16_norms_fuse_their_weight(arch, mode):
    """In bf16 the upcast is a real node: the match must absorb it (x is the bf16 input)."""
    model = tiny_model(arch, dtype=torch.bfloat16)
    report = fuser.explain(model, tiny_inputs(model))
    modes = {m.mode.split(", eps")[0] for m in report.matches if m.pattern == "rms_norm"}
    assert modes == {mode}, report


def _compile(model, options=None):
    torch._dynamo.reset()
    fuser.reset_reports()
    return torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True, **(options or {})})


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "olmoe", "mixtral", "deepseek_v3"])
def test_compiled_logits_match_float64(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(model)
    with torch.no_grad():
        logits = _compile(model)(ids).logits
        reference = float64_reference(model)(ids).logits
    assert fuser.last_report().counts().get("rms_norm") == EXPECTED_RMS_NORMS[arch]
    assert_close(logits, reference, torch.float32)


def test_bfloat16_model_with_inductor():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = tiny_inputs(model)
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser")(ids).logits
        reference = float64_reference(model)(ids).logits
    assert fuser.last_report().counts().get("rms_norm") == 5
    assert_close(logits, reference, torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "olmoe"])
def test_training_step_gradients_match_float64(arch):
    model = tiny_model(arch).train()
    reference = float64_reference(model)
    ids = tiny_inputs(model)
    _compile(model)(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    assert fuser.last_report().counts().get("rms_norm") == EXPECTED_RMS_NORMS[arch]
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert any("norm" in name for name in grads)
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert_close(grads[name], p.grad, torch.float32, tol=1e-5)


def test_changing_lengths_reuses_the_dynamic_graph():
    model = tiny_model("llama")
    compiled = _compile(model)
    with torch.no_grad():
        for length in (5, 8, 13, 21):
            ids = tiny_inputs(model, length=length)
            assert_close(compiled(ids).logits, float64_reference(model)(ids).logits, torch.float32)
    counts = [r.counts().get("rms_norm") for r in fuser.backend._reports]
    assert len(counts) <= 2 and set(counts) == {5}, counts
