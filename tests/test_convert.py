"""`fuser.convert(model)`: the same model object on fused kernels without torch.compile, proven on
tiny configs of real architectures: the kernels run, logits meet the float64 contract, greedy
generation is unchanged, weights and checkpoints are untouched; modules are swapped only
after a numerical check, and a dry run changes nothing."""
import copy
import dataclasses
import io
from collections import Counter

import pytest
import torch
from torch import nn

import fuser
from fuser import backend as fuser_backend_module
from fuser.convert import FusedModule
from fuser.models import tiny_inputs, tiny_model
from fuser.patterns.norms import RMS_NORM
from helpers import float64_reference
from numerics import assert_close

if not hasattr(torch.ops.fuser, "attention"):
    pytest.skip("fuser::attention is not built yet (kernels/attention)", allow_module_level=True)

# (rms_norm modules, attention layers) of each tiny model (2 layers)
EXPECTED = {"llama": (5, 2), "mistral": (5, 2), "qwen2": (5, 2), "gpt2": (0, 2), "bert": (0, 2), "olmoe": (9, 2),
            "mixtral": (5, 2), "deepseek_v3": (9, 2)}


def _fused_op_calls(model, *args, **kwargs) -> Counter:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.no_grad():
        model(*args, **kwargs)
    return Counter(e.name for e in profile.events() if e.name in ("fuser::rms_norm", "fuser::attention"))


def _fused_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, FusedModule)]


@pytest.mark.parametrize("arch", EXPECTED)
def test_convert_runs_the_kernels_matches_float64_and_generates_the_same(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(model)
    norms, attention_layers = EXPECTED[arch]
    reference, original = float64_reference(model), copy.deepcopy(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    report = fuser.convert(model, dry_run=True)
    assert report.counts() == {k: v for k, v in (("rms_norm", norms), ("attention", attention_layers)) if v}, report
    assert not report.near_misses, report
    assert _fused_modules(model) == [] and model.config._attn_implementation == "eager"  # a dry run changes nothing

    assert fuser.convert(model) is model
    assert len(_fused_modules(model)) == norms and model.config._attn_implementation == "fuser"
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    calls = _fused_op_calls(model, ids)
    assert calls == Counter({k: v for k, v in (("fuser::rms_norm", norms), ("fuser::attention", attention_layers)) if v})
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, torch.float32)
    if arch != "bert":
        prompt = ids[:1, :5]
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                           original.generate(prompt, max_new_tokens=5, do_sample=False))


def test_a_bfloat16_model_converts_every_norm():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = tiny_inputs(model)
    reference = float64_reference(model)
    assert fuser.convert(model, dry_run=True).counts() == {"rms_norm": 5, "attention": 2}
    fuser.convert(model)
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, torch.bfloat16)


def test_padding_masks_reach_the_kernel():
    model = tiny_model("qwen2")
    ids = tiny_inputs(model, batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0   # left padding
    mask[2, 6:] = 0   # right padding
    reference = float64_reference(model)
    reference.set_attn_implementation("sdpa")  # eager in float64 turns fully masked pad rows into NaN
    fuser.convert(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        expected = reference(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close(logits[keep], expected[keep], torch.float32)


def test_checkpoints_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = fuser.convert(tiny_model("mistral"))
    ids = tiny_inputs(model)
    model.save_pretrained(tmp_path)
    assert "fuser" not in (tmp_path / "config.json").read_text()  # loads anywhere, without fuser
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(reloaded(ids).logits, expected, torch.float32)
        assert_close(fuser.convert(reloaded)(ids).logits, expected, torch.float32)


def test_converted_modules_copy_pickle_and_fall_back_for_other_dtypes():
    model = fuser.convert(tiny_model("llama", layers=1))
    norm = model.model.norm
    x = torch.randn(2, 3, 64)
    for copied in (copy.deepcopy(norm), _pickled(norm)):
        assert type(copied) is type(norm) and torch.equal(copied(x), norm(x))
    original_forward = type(norm).__mro__[2].forward
    model.to(torch.bfloat16)  # checked for float32 only: other dtypes run the module's own code
    x = x.to(torch.bfloat16)
    assert torch.equal(norm(x), original_forward(norm, x))
    assert _fused_op_calls(norm, x) == Counter()


def _pickled(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class Norm(nn.Module):
    def __init__(self, size, dim=-1, then=None):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(size))
        self.dim, self.then = dim, then

    def forward(self, x):
        out = self.weight * (x * torch.rsqrt(x.pow(2).mean(self.dim, keepdim=True) + 1e-6))
        return out if self.then is None else self.then(out)


class Scale(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))

    def forward(self, x):
        return x * self.weight


def test_only_modules_whose_forward_is_one_checked_op_are_swapped():
    model = nn.Sequential(Norm(16), Norm(16, dim=1), Norm(16, then=torch.relu), Scale(16), nn.LayerNorm(16))
    report = fuser.convert(model, dry_run=True)
    assert [m.where.module for m in report.matches] == ["0"]
    assert {n.where.module: n.reason for n in report.near_misses} == {
        "1": "mean over dim -2, not over the last dim only",
        "2": "its forward is more than the rms_norm (it computes rms_norm, relu)"}
    x = torch.randn(2, 5, 16)
    expected = model(x)
    fuser.convert(model)
    assert _fused_modules(model) == ["0"]
    torch.testing.assert_close(model(x), expected)


def test_a_wrong_kernel_is_caught_before_any_swap(monkeypatch):
    def wrong_eps(m):
        return torch.ops.fuser.rms_norm(m["x"], m.get("weight"), float(m["eps"]) + 0.5, 0.0, True,
                                        m.output.meta["example_value"].dtype)

    monkeypatch.setattr(fuser_backend_module, "PATTERNS", (dataclasses.replace(RMS_NORM, replace=wrong_eps),))
    model = fuser.convert(tiny_model("llama", layers=1))
    assert _fused_modules(model) == []
    report = fuser.convert(model, dry_run=True)
    assert report.counts() == {"attention": 1} and len(report.near_misses) == 3
    assert all(n.reason.startswith("the fused op on a random input") and "relative L2 error" in n.reason
               for n in report.near_misses), report


def test_convert_takes_modules_only():
    with pytest.raises(TypeError, match="takes a torch.nn.Module.*backend='fuser'"):
        fuser.convert(lambda x: x)
