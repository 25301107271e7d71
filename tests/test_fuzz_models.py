"""`fuser.fuzz(model, *inputs)`: hypothesis over every site the backend rewrites in a model,
with the model's inputs redrawn (sizes varied where the graph is dynamic); a wrong kernel is
caught, shrunk and reported with its seed."""
import dataclasses
import logging
import math
import re

import pytest
import torch

import fuser
from fuser import options as fuser_options
from fuser.models import tiny_inputs, tiny_model
from fuser.patterns import PATTERNS
from fuser.patterns.norms import RMS_NORM


def test_fuzz_a_model_checks_every_site_at_varied_sizes(caplog):
    model = tiny_model("llama", layers=1)
    with caplog.at_level(logging.DEBUG, logger="fuser.fuzz"):  # each example's sizes are debug detail
        result = fuser.fuzz(model, tiny_inputs(model, batch=2, length=9), max_examples=4, seed=0)
    assert result.ok, str(result)
    assert sorted(result.sites) == ["attention@model.layers.0.self_attn", "rms_norm@model.layers.0.input_layernorm",
                                    "rms_norm@model.layers.0.post_attention_layernorm", "rms_norm@model.norm"]
    assert result.examples >= 4
    for site in result.sites:  # values and the gradients of every differentiable input, each within float32's bound
        keys = {k.rsplit(".", 1)[1] for k in result.worst_error if k.startswith(site + ".")}
        assert keys == ({"out", "dq", "dk", "dv"} if site.startswith("attention") else {"out", "dx", "dweight"}), keys
    assert all(0 < e <= 1e-5 for e in result.worst_error.values()), result.worst_error
    lengths = {int(n) for n in re.findall(r"=(\d+)", " ".join(r.getMessage() for r in caplog.records
                                                               if "ModelExample" in r.getMessage()))}
    assert len(lengths) > 1 and max(lengths) <= 9, lengths  # sizes vary, within the example's


def test_fuzz_a_function_draws_its_tensor_inputs():
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    result = fuser.fuzz(norm, torch.randn(3, 5, 24), torch.randn(24), max_examples=3, seed=1)
    assert result.ok and result.sites == ["rms_norm@<top>"], str(result)
    assert set(result.worst_error) == {"rms_norm@<top>.out", "rms_norm@<top>.dx", "rms_norm@<top>.dweight"}


def test_a_planted_wrong_kernel_is_caught_and_shrunk(monkeypatch):
    def wrong_eps(m):
        return torch.ops.fuser.rms_norm(m["x"], m.get("weight"), float(m["eps"]) + 0.5, float(m.get("offset", 0.0)),
                                        True, m.output.meta["example_value"].dtype)

    monkeypatch.setattr(fuser_options, "PATTERNS", (dataclasses.replace(RMS_NORM, replace=wrong_eps),))
    model = tiny_model("qwen2", layers=1)
    result = fuser.fuzz(model, tiny_inputs(model, batch=2, length=6), max_examples=5, seed=7, grads=False)
    assert not result.ok and result.seed == 7
    text = str(result)
    assert text.startswith("fuzz Qwen2ForCausalLM: FAILED at example 1: rms_norm@model.layers.0.input_layernorm: "
                           "output: relative L2 error "), text  # what broke, its error beside the bound, first
    assert re.search(r"error \d\.\d\de-\d\d above the tolerance 1e-05", text.splitlines()[0]), text
    # the smallest sizes the graph allows, named by the model's own arguments
    assert "shrunk example: ModelExample(sizes: input_ids.size(0)=2, input_ids.size(1)=2; values from seed" in text, text
    assert "reproduce with seed=7" in text
    assert result.failed_at == 1 and result.examples == 1


def test_a_model_with_nothing_to_rewrite():
    result = fuser.fuzz(torch.nn.Linear(4, 3), torch.randn(2, 4), max_examples=2, seed=0)
    assert result.ok and result.sites == [] and result.examples == 0
    assert "nothing to fuzz" in str(result)


def test_fuzz_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown pattern 'nope'; known patterns are"):
        fuser.fuzz("nope")
    with pytest.raises(TypeError, match="a pattern draws its own inputs"):
        fuser.fuzz("softmax", torch.randn(3))
    with pytest.raises(TypeError, match="pattern name or a model"):
        fuser.fuzz(3)


def test_patterns_still_fuzz_by_name():
    result = fuser.fuzz("softmax", max_examples=3, seed=0)
    assert result.ok and result.examples >= 3 and all(math.isfinite(e) for e in result.worst_error.values())
    assert {p.name for p in PATTERNS} >= {"softmax", "rms_norm", "attention"}


def test_the_result_says_what_ran_the_fused_ops(monkeypatch):
    """A fuzz run proves the code that ran: the kernels (here through the interpreter) or the references."""
    assert "ran as Triton kernels through the interpreter" in str(fuser.fuzz("softmax", max_examples=2, seed=0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "ran as their plain-torch references (set TRITON_INTERPRET=1" in str(
        fuser.fuzz("softmax", max_examples=2, seed=0, device="cpu"))
    with pytest.raises(TypeError, match="`device` is for patterns"):
        fuser.fuzz(torch.nn.Softmax(-1), torch.randn(3, 4), device="cpu")
