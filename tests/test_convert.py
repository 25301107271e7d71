"""`fuser.convert(model)`: the same model object on fused kernels without torch.compile, proven on
tiny configs of real architectures: the kernels run, logits meet the float64 contract, greedy
generation is unchanged, weights and checkpoints are untouched; modules are swapped only
after a numerical check (gradients included), and a dry run changes nothing. Given example
inputs, convert also rewrites the graphs of plain (non-HF) modules: hand-written attention and
norms; a forward that cannot be captured whole is left alone with the reason."""
import copy
import dataclasses
import io
import math
from collections import Counter

import pytest
import torch
from torch import nn

import fuser
from fuser import options as fuser_options
from fuser.modules.convert import WITHOUT_EXAMPLES
from fuser.modules.moe_blocks import MoEBlock
from fuser.modules.swap import FusedModule
from fuser.models import tiny_gpt_oss, tiny_inputs, tiny_model
from fuser.patterns.norms import RMS_NORM
from helpers import float64_reference
from numerics import assert_close

if not hasattr(torch.ops.fuser, "attention"):
    pytest.skip("fuser::attention is not built yet (kernels/attention)", allow_module_level=True)

# (rms_norm modules, attention layers, MoE experts modules) of each tiny model (2 layers)
EXPECTED = {"llama": (5, 2, 0), "mistral": (5, 2, 0), "qwen2": (5, 2, 0), "gpt2": (0, 2, 0), "bert": (0, 2, 0),
            "olmoe": (9, 2, 2), "mixtral": (5, 2, 2), "deepseek_v3": (9, 2, 1)}
OPS = ("fuser::rms_norm", "fuser::attention", "fuser::moe_experts")
LATENT_ATTENTION = {"deepseek_v3": 2}  # MLA layers decoding in the latent space (tests/test_latent_attention_convert.py)


def _fused_op_calls(model, *args, **kwargs) -> Counter:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.no_grad():
        model(*args, **kwargs)
    return Counter(e.name for e in profile.events() if e.name in OPS)


def _fused_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, FusedModule)]


@pytest.mark.parametrize("arch", EXPECTED)
def test_convert_runs_the_kernels_matches_float64_and_generates_the_same(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(model)
    norms, _, experts = EXPECTED[arch]
    reference, original = float64_reference(model), copy.deepcopy(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    report = fuser.convert(model, dry_run=True)
    latent = LATENT_ATTENTION.get(arch, 0)
    assert report.counts() == {k: v for k, v in zip(("rms_norm", "attention", "moe", "latent_attention"),
                                                    (*EXPECTED[arch], latent)) if v}, report
    assert not report.near_misses, report
    experts_implementation = model.config._experts_implementation
    assert _fused_modules(model) == [] and model.config._attn_implementation == "eager"  # a dry run changes nothing
    assert model.config._experts_implementation == experts_implementation
    assert report.notes == [WITHOUT_EXAMPLES]

    assert fuser.convert(model) is model
    assert len(_fused_modules(model)) == norms + latent and model.config._attn_implementation == "fuser"
    assert (model.config._experts_implementation == "fuser") == bool(experts)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    calls = _fused_op_calls(model, ids)
    assert calls == Counter({op: n for op, n in zip(OPS, EXPECTED[arch]) if n})
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
    # with an example input, graph rewriting takes the norm followed by a relu (and says its own word on "1")
    report = fuser.convert(model, x, dry_run=True)
    assert [m.where.module for m in report.matches] == ["0", "2"] and not report.notes
    assert {n.where.module: n.reason for n in report.near_misses} == {"1": "mean over dim -2, not over the last dim only"}
    fuser.convert(model)
    assert _fused_modules(model) == ["0"]
    torch.testing.assert_close(model(x), expected)


def _planted_rms_norm(monkeypatch, op, eps_shift=0.0):
    """The rms_norm pattern, its replacement calling `op` (with eps shifted by `eps_shift`): a planted bug."""
    def replace(m):
        return op(m["x"], m.get("weight"), float(m["eps"]) + eps_shift, 0.0, True, m.output.meta["example_value"].dtype)

    monkeypatch.setattr(fuser_options, "PATTERNS", (dataclasses.replace(RMS_NORM, replace=replace),))


def test_a_wrong_kernel_is_caught_before_any_swap(monkeypatch):
    _planted_rms_norm(monkeypatch, torch.ops.fuser.rms_norm, eps_shift=0.5)
    model = fuser.convert(tiny_model("llama", layers=1))
    assert _fused_modules(model) == []
    report = fuser.convert(model, dry_run=True)
    assert report.counts() == {"attention": 1} and len(report.near_misses) == 3
    assert all(n.reason.startswith("on a random input of shape") and "the fused op: relative L2 error" in n.reason
               for n in report.near_misses), report


def test_hand_written_moe_blocks_are_swapped_after_their_check():
    from test_moe import LoopMoEModel

    model = LoopMoEModel(num_experts=4, top_k=2)
    reference = copy.deepcopy(model).double()
    report = fuser.convert(model, dry_run=True)
    assert report.counts() == {"moe": 2} and not report.near_misses, report
    assert fuser.convert(model) is model
    assert all(isinstance(block, FusedModule) and isinstance(block.fuser_call, MoEBlock) for block in model.blocks)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert_close(model(x), reference(x.double()), torch.float32)


def test_convert_takes_modules_only_and_example_inputs_the_model_accepts():
    with pytest.raises(TypeError, match="takes a torch.nn.Module.*backend='fuser'"):
        fuser.convert(lambda x: x)
    with pytest.raises(ValueError, match="raised RuntimeError on the example inputs"):
        fuser.convert(nn.Linear(4, 4), torch.randn(2, 5))


# --- plain modules, by graph rewriting ---------------------------------------------------------------

class ScaleNorm(nn.Module):
    """An RMSNorm the module-level converter does not take (its weight is called `scale`), spelled with a division."""

    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(size))
        self.eps = eps

    def forward(self, x):
        return self.scale * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    """Causal self-attention as people write it by hand."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = Norm(dim), Attention(dim, heads), ScaleNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A language model written with torch.nn alone: no transformers, no attention interface."""

    def __init__(self, vocab=40, dim=32, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads)])
        self.norm = ScaleNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def test_a_plain_model_is_converted_by_rewriting_its_modules_graphs():
    model = TinyLM()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).double()
    weights = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}

    report = fuser.convert(model, ids, dry_run=True)
    assert {(m.pattern, m.where.module) for m in report.matches} == {
        ("rms_norm", "blocks.0.norm1"), ("attention", "blocks.0.attn"), ("rms_norm", "blocks.0.norm2"),
        ("rms_norm", "norm")}, report
    assert not report.near_misses and not report.notes, report
    assert _fused_modules(model) == []

    assert fuser.convert(model, ids) is model
    assert _fused_modules(model) == ["blocks.0.norm1", "blocks.0.attn", "blocks.0.norm2", "norm"]
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k][0]) and v.data_ptr() == weights[k][1] for k, v in model.state_dict().items())
    other_length = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    assert _fused_op_calls(model, other_length) == Counter({"fuser::rms_norm": 3, "fuser::attention": 1})

    logits, expected = model(other_length), reference(other_length)
    assert_close(logits, expected, torch.float32)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits.backward(grad.float())
    expected.backward(grad)
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, p64.grad, torch.float32)

    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(ids), model(ids)) and torch.equal(_pickled(model)(ids), model(ids))


class BranchingAttention(Attention):
    """Scales a large input down first: data-dependent Python control flow."""

    def forward(self, x):
        if x.abs().max() > 100:
            x = x / 100
        return super().forward(x)


class CountingAttention(Attention):
    """Counts its calls: a side effect a captured graph would drop."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


@pytest.mark.parametrize("attention, reason", [
    (BranchingAttention, "Data-dependent branching at `if x.abs().max() > 100:`"),
    (CountingAttention, "side effects"),
])
def test_a_forward_that_cannot_be_captured_whole_is_left_alone_with_the_reason(attention, reason):
    model = nn.Sequential(attention(16, 2))
    x = torch.randn(2, 5, 16)
    expected = model(x)
    report = fuser.convert(model, x, dry_run=True)
    assert report.counts() == {}
    (miss,) = report.near_misses
    assert (miss.pattern, miss.where.module) == ("attention", "0")
    assert miss.reason.startswith("its module's forward cannot be captured as one graph") and reason in miss.reason, miss
    fuser.convert(model, x)
    assert _fused_modules(model) == []
    assert torch.equal(model(x), expected)


class MaskedAttention(Attention):
    """Takes an additive mask, which the fused op reads as a constant (it gives the mask no gradient)."""

    def forward(self, x, mask):
        batch, length, dim = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(dim, dim=-1))
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5 + mask, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, dim))


def test_a_learned_additive_mask_gets_its_gradient_from_the_fused_op():
    """The attention backward gives an added float mask its gradient (dS summed to the mask's shape): convert
    keeps no restriction for it, and a mask that requires grad runs the fused op and gets the module's gradient."""
    attention = MaskedAttention(16, 2)  # its scale is size arithmetic: (dim // heads) ** -0.5
    x, mask = torch.randn(2, 5, 16), torch.randn(1, 1, 5, 5)
    report = fuser.convert(attention, x, mask, dry_run=True)
    assert report.counts() == {"attention": 1} and report.notes == [], report
    original = copy.deepcopy(attention)
    fuser.convert(attention, x, mask)
    assert _fused_op_calls(attention, x, mask) == Counter({"fuser::attention": 1})
    learned, reference = mask.clone().requires_grad_(), mask.clone().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = attention(x, learned)
    assert any(e.name.startswith("fuser::attention") for e in profile.events())
    expected = original(x, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_close(out, expected, torch.float32)
    assert_close(learned.grad, reference.grad, torch.float32)


@torch.library.custom_op("fuser_test::rms_norm_wrong_weight_gradient", mutates_args=())
def rms_norm_wrong_weight_gradient(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float,
                                   weight_before_cast: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """fuser::rms_norm with a planted backward bug: its weight gradient comes out twice as large."""
    return torch.ops.fuser.rms_norm(x, weight, eps, weight_offset, weight_before_cast, out_dtype)


@rms_norm_wrong_weight_gradient.register_fake
def _(x, weight, eps, weight_offset, weight_before_cast, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.eps, ctx.weight_offset = inputs[2:4]


def _twice_the_weight_gradient(ctx, grad_out):
    dx, dw = torch.ops.fuser.rms_norm_backward(grad_out, *ctx.saved_tensors, ctx.eps, ctx.weight_offset)
    return dx, 2 * dw, None, None, None, None


rms_norm_wrong_weight_gradient.register_autograd(_twice_the_weight_gradient, setup_context=_save_for_backward)


def test_a_wrong_gradient_is_caught_before_any_swap(monkeypatch):
    _planted_rms_norm(monkeypatch, torch.ops.fuser_test.rms_norm_wrong_weight_gradient)
    model = nn.Sequential(Norm(16), ScaleNorm(16))
    x = torch.randn(2, 5, 16)
    # the module-level converter (no example inputs) and graph rewriting (given them) both check gradients
    (miss,) = fuser.convert(model, dry_run=True).near_misses
    assert miss.where.module == "0" and miss.reason.startswith(
        "on a random input of shape [1, 1, 16], the fused op: the gradient of weight: relative L2 error"), miss
    report = fuser.convert(model, x, dry_run=True)
    assert report.counts() == {}
    assert {n.where.module: n.reason.split(": relative L2 error")[0] for n in report.near_misses} == {
        "0": "on random arguments, the gradient of weight", "1": "on random arguments, the gradient of scale"}, report
    fuser.convert(model, x)
    assert _fused_modules(model) == []
    # the forward alone is right: with nothing to train, the same op passes the checks
    model.eval().requires_grad_(False)
    assert fuser.convert(model, dry_run=True).counts() == {"rms_norm": 1}
    assert fuser.convert(model, x, dry_run=True).counts() == {"rms_norm": 2}


def test_an_hf_model_with_example_inputs_converts_as_without():
    model = tiny_model("llama", layers=1)
    ids = tiny_inputs(model)
    original = copy.deepcopy(model)
    report = fuser.convert(model, ids, dry_run=True)
    assert report.counts() == {"rms_norm": 3, "attention": 1} and not report.near_misses and not report.notes, report
    fuser.convert(model, ids)
    prompt = ids[:1, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                       original.generate(prompt, max_new_tokens=5, do_sample=False))


def test_experts_that_fail_their_check_keep_their_implementation(monkeypatch):
    """A wrong fused experts result (planted: 1% off) is caught before the model switches: every
    experts module is a near miss saying what differed, and the model keeps its implementation."""
    import fuser.integrations.transformers as seams
    model = tiny_model("olmoe")
    before = model.config._experts_implementation
    right = seams.fuser_experts_forward
    monkeypatch.setattr(seams, "fuser_experts_forward", lambda *args: right(*args) * 1.01)
    report = fuser.convert(model, dry_run=True)
    misses = [m for m in report.near_misses if m.pattern == "moe"]
    assert len(misses) == 2 and all("differ from the module's own code: output" in m.reason for m in misses), report
    assert "moe" not in report.counts()
    fuser.convert(model)
    assert model.config._experts_implementation == before


# --- what transformers hands the attention function ---------------------------------------------------

def test_attention_with_sinks_is_converted_and_exact():
    """gpt-oss passes its sinks (s_aux) to the attention function: the "fuser" implementation joins them to the
    softmax (before, it handed them to SDPA, which ignores them: logits 0.2 off, and the dry run said
    "converted"). Logits against float64, the sinks' gradient against the eager model's, greedy tokens."""
    model = tiny_gpt_oss()
    original = copy.deepcopy(model)
    ids = tiny_inputs(model)
    reference = float64_reference(model)
    report = fuser.convert(model, dry_run=True)
    assert report.counts().get("attention") == 2, report
    assert fuser.convert(model) is model and model.config._attn_implementation == "fuser"
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, torch.float32)
    for m in (model, original):
        m.train()
        m(ids, labels=ids).loss.backward()
    sinks = [(a.self_attn.sinks.grad, b.self_attn.sinks.grad) for a, b in zip(model.model.layers, original.model.layers)]
    assert all(g is not None and g.abs().sum() > 0 for g, _ in sinks)
    for grad, expected in sinks:
        assert_close(grad, expected, torch.float32)
    model.eval(), original.eval()
    prompt = ids[:1, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                       original.generate(prompt, max_new_tokens=5, do_sample=False))


def test_the_fuser_attention_refuses_what_it_does_not_implement():
    """The "fuser" attention implementation raises on an argument it does not implement rather than ignore it."""
    from fuser.integrations.transformers import fuser_attention

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=r"passes position_bias \(a position bias\), which fuser::attention"):
        fuser_attention(torch.nn.Linear(1, 1), q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))
