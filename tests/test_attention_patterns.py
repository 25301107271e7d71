"""The attention pattern: every spelling of naive attention and every HF architecture's
attention becomes one fused op with the right kernel mode; near misses are left alone."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fuser
from fuser.models import tiny_inputs, tiny_model
from fuser.numerics.contract import judge, neighbour_floors, nudged
from helpers import compile_and_run, compiled_with_padding, float64_reference
from numerics import assert_close, rel_l2

B, H, KV, L, D = 2, 4, 2, 13, 16


def _qkv(dtype=torch.float32, lq=L, lk=L, kv_heads=H, dv=D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, lq, D, generator=g).to(dtype)
    k = torch.randn(B, kv_heads, lk, D, generator=g).to(dtype)
    v = torch.randn(B, kv_heads, lk, dv, generator=g).to(dtype)
    return q, k, v


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


CAUSAL = torch.ones(L, L, dtype=torch.bool).tril()
SINKS = torch.linspace(-1.0, 2.0, H)


def with_sinks(q, k, v):
    """gpt-oss's sinks, written by hand: one logit per head joins the softmax, its column dropped after it."""
    scores = q @ k.transpose(-2, -1) * 0.25
    combined = torch.cat([scores, SINKS.to(q.dtype).reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)], -1)
    combined = combined - combined.amax(-1, keepdim=True)
    return combined.softmax(-1)[..., :-1] @ v

SPELLINGS = {
    # name: (function of q, k, v, the mode the report must name)
    "matmul, mul scale": (lambda q, k, v: torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * D ** -0.5,
                                                                     dim=-1), v), "no mask"),
    "@ and div": (lambda q, k, v: (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v, "no mask"),
    "einsum": (lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", F.softmax(
        torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, dim=-1), v), "no mask"),
    "scale on q": (lambda q, k, v: torch.softmax((q * 0.25) @ k.transpose(-2, -1), -1) @ v, "no mask"),
    "fp32 softmax, cast back": (lambda q, k, v: F.softmax(q @ k.mT * 0.25, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
                                "no mask"),
    "triu masked_fill -inf": (lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(
        torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1), float("-inf")), -1) @ v, "causal, no mask read"),
    "tril where finfo.min": (lambda q, k, v: torch.softmax(torch.where(
        torch.tril(torch.ones(L, L, dtype=torch.bool)), q @ k.transpose(-2, -1) * 0.25, torch.finfo(q.dtype).min), -1)
        @ v, "causal, no mask read"),
    "index comparison": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + torch.where(
        torch.arange(L)[None, None, None, :] <= torch.arange(L)[None, None, :, None], 0.0, float("-inf")).to(q.dtype),
        -1) @ v,
        "causal, no mask read"),
    "softcap": (lambda q, k, v: torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * 0.25 / 30.0) * 30.0, -1) @ v,
                "softcap 30"),
    "repeat_kv": (lambda q, k, v: torch.softmax(q @ repeat_kv(k[:, :KV], 2).transpose(-2, -1) * 0.25, -1)
                  @ repeat_kv(v[:, :KV], 2), "GQA 2:1"),
    "repeat_interleave": (lambda q, k, v: torch.softmax(q @ k[:, :1].repeat_interleave(H, dim=1).transpose(-2, -1)
                                                        * 0.25, -1) @ v[:, :1].repeat_interleave(H, dim=1), "MQA 4:1"),
    "sdpa after repeat_kv": (lambda q, k, v: F.scaled_dot_product_attention(
        q, repeat_kv(k[:, :KV], 2), repeat_kv(v[:, :KV], 2), is_causal=True), "causal, GQA 2:1"),
    "sdpa with a causal mask tensor": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool).tril()), "causal, no mask read"),
    "sdpa with an additive causal mask": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(torch.ones(L, L, dtype=torch.bool).tril(), 0.0, float("-inf")).to(q.dtype)),
        "causal, no mask read"),
    "sinks": (with_sinks, "sinks"),
    "bool mask added to the scores": (lambda q, k, v: torch.softmax(
        q @ k.transpose(-2, -1) * 0.25 + CAUSAL[None, None], -1) @ v, "mask read as a tensor"),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_attention_spelling_is_one_match(spelling, dtype):
    fn, mode = SPELLINGS[spelling]
    q, k, v = _qkv(dtype)
    out, report = compile_and_run(fn, q, k, v, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    assert mode in report.matches[0].mode, report
    assert_close(out, fn(q.double(), k.double(), v.double()), dtype)


def test_gradients_through_the_rewrite():
    fn = SPELLINGS["repeat_kv"][0]
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, report = compile_and_run(fn, q, k, v, options={"strict": True})
    assert report.counts() == {"attention": 1}
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(fn(q64, k64, v64).sum(), (q64, k64, v64))
    for got, ref in zip(grads, want):
        assert_close(got, ref, torch.float32)


def test_an_additive_padding_mask_passes_gradient_on_rows_that_see_only_padding():
    """where(causal & padding, 0, finfo.min) added to the scores runs as causal + key padding; a row
    that sees only padding softmaxes score + fill over every key, and its gradient reaches q and k."""
    def fn(q, k, v, padding):
        batch = torch.arange(B)[:, None, None, None]
        q_pos, k_pos = torch.arange(L)[None, None, :, None], torch.arange(L)[None, None, None, :]
        mask = torch.where((k_pos <= q_pos) & padding[batch, k_pos], 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, -1) @ v

    padding = torch.ones(B, L, dtype=torch.bool)
    padding[0, :4] = False
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, report = compile_and_run(fn, q, k, v, padding, options={"strict": True})
    assert report.counts() == {"attention": 1} and "causal, key padding" in report.matches[0].mode, report
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = fn(*leaves, padding)
    assert_close(out, ref, torch.float32)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, torch.ones_like(ref))):
        assert_close(got, want, torch.float32)


def _padding():
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :4] = False
    return keep


# masks of every rank that broadcasts to the scores [B, H, L, L]: (function of q, k, v, mask; the mask; the mode)
LOWER_RANK_MASKS = {
    "2-D additive causal from triu": (
        lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + torch.triu(
            torch.full((L, L), float("-inf")), 1).to(q.dtype), -1) @ v, None, "causal, no mask read"),
    "2-D float mask": (lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + m, -1) @ v,
                       torch.randn(L, L, generator=torch.Generator().manual_seed(1)), "mask read as a tensor"),
    "3-D bool mask, masked_fill": (
        lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(m, float("-inf")), -1) @ v,
        ~CAUSAL.expand(H, L, L).clone(), "mask read as a tensor"),
    "[B, 1, 1, L] padding, where": (
        lambda q, k, v, m: torch.softmax(torch.where(m[:, None, None, :], q @ k.transpose(-2, -1) * 0.25,
                                                     float("-inf")), -1) @ v, _padding(), "key padding"),
    "[B, 1, 1, L] additive padding tensor": (
        lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + m, -1) @ v,
        torch.where(_padding(), 0.0, -1e9)[:, None, None, :].clone(), "mask read as a tensor"),
}


@pytest.mark.parametrize("case", LOWER_RANK_MASKS)
def test_masks_of_lower_rank_are_matched(case):
    """Any mask that broadcasts to [B, H, Lq, Lk] ([L, L], [H, L, L], [B, 1, 1, L]) is one match, and
    its construction is still recognized (triu of a -inf fill is causal)."""
    fn, mask, mode = LOWER_RANK_MASKS[case]
    q, k, v = _qkv()
    out, report = compile_and_run(fn, q, k, v, mask, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    assert mode in report.matches[0].mode, report
    ref_mask = mask.double() if mask is not None and mask.dtype.is_floating_point else mask
    assert_close(out, fn(q.double(), k.double(), v.double(), ref_mask), torch.float32)


def test_gradients_through_a_2d_additive_mask():
    fn, mask, _ = LOWER_RANK_MASKS["2-D float mask"]
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, report = compile_and_run(fn, q, k, v, mask, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(fn(*leaves, mask.double()).sum(), leaves)
    for got, ref in zip(grads, want):
        assert_close(got, ref, torch.float32)


def test_a_mask_that_does_not_broadcast_to_the_scores_is_left_alone():
    """scores [1, H, L, L] + mask [3, 1, L, L] is a [3, H, L, L] tensor: not an attention the kernel computes."""
    mask = torch.randn(3, 1, L, L)
    q, k, v = (t[:1] for t in _qkv())

    def fn(q, k, v, m):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + m, -1) @ v

    out, report = compile_and_run(fn, q, k, v, mask)
    assert "attention" not in report.counts(), report
    assert any(n.pattern == "attention" and f"mask of shape (3, 1, {L}, {L}) does not broadcast to the scores' "
               f"shape (1, {H}, {L}, {L})" in n.reason for n in report.near_misses), report
    assert_close(out, fn(q.double(), k.double(), v.double(), mask.double()), torch.float32)


NEAR_MISSES = {
    # name: (function, what the report must say, or None when no attention site should be seen at all)
    "softmax over the queries": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-2) @ v,
                                 "softmax over dim -2"),
    "mask applied after softmax": (lambda q, k, v: (torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1)
                                                    * CAUSAL) @ v, None),
    "value matmul of another tensor": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1).exp() @ v,
                                       None),
    "last column dropped, no sinks": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1)[..., :-1]
                                      @ v[:, :, :-1], "do not form an attention"),
    "probabilities used twice": (lambda q, k, v: (lambda p: (p @ v, p))(torch.softmax(q @ k.transpose(-2, -1), -1)),
                                 "used outside"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_attention_near_misses_are_left_alone(case):
    fn, reason = NEAR_MISSES[case]
    q, k, v = _qkv()
    out, report = compile_and_run(fn, q, k, v, options={"strict": True})
    assert "attention" not in report.counts(), report
    if reason is not None:
        assert any(n.pattern == "attention" and reason in n.reason for n in report.near_misses), report
    expected = fn(q.double(), k.double(), v.double())
    for got, ref in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        assert_close(got, ref, torch.float32)


def test_a_learned_additive_bias_is_rewritten_with_its_gradient():
    """A relative-position-style bias [1, H, L, L] that takes a gradient, with a causal mask folded in (T5's
    position_bias + mask): read as a tensor, and given dS summed over the batch."""
    bias = (torch.randn(1, H, L, L, generator=torch.Generator().manual_seed(4)) * 0.5).requires_grad_()
    causal = torch.where(CAUSAL, 0.0, torch.finfo(torch.float32).min)
    q, k, v = (t.requires_grad_() for t in _qkv())

    def fn(q, k, v, b):
        return torch.softmax(q @ k.transpose(-2, -1) + (b + causal.to(b.dtype)), -1) @ v

    out, report = compile_and_run(fn, q, k, v, bias, options={"strict": True})
    assert report.counts() == {"attention": 1}, report
    assert "mask read as a tensor" in report.matches[0].mode
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    want = torch.autograd.grad(fn(*leaves).sum(), leaves)
    for got, ref in zip(grads, want):
        assert_close(got, ref, torch.float32)


# attention sites of each tiny model (2 layers) and the mode the kernel runs
MODELS = {
    "llama": "causal", "mistral": "causal, window 5", "qwen2": "causal", "mixtral": "causal", "olmoe": "causal",
    "deepseek_v3": "causal", "gpt2": "causal", "bert": "no mask",
}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("padding", [False, True])
def test_every_layer_of_eager_attention_models_is_rewritten(arch, padding):
    model = tiny_model(arch)
    logits, original, reference, report = compiled_with_padding(model, tiny_inputs(model), padding, 3, "logits")
    assert report.counts().get("attention") == 2, report
    modes = {m.mode.split(", GQA")[0].split(", head dim")[0] for m in report.matches if m.pattern == "attention"}
    expected = {("no mask", True): "key padding", ("no mask", False): "no mask"}.get(
        (MODELS[arch], padding), MODELS[arch] + (", key padding" if padding else ", no mask read"))
    assert modes == {expected}, modes
    assert_close(logits, original, torch.float32)
    if not padding:  # with padding, HF's float64 copy softmaxes in float32, where its finfo(float64).min
        assert_close(logits, reference, torch.float32)  # fill is -inf: NaN rows that spread to every row


@pytest.mark.parametrize("arch, expected", [("llama", 0), ("mistral", 2)])
def test_sdpa_models_are_rewritten_only_where_it_pays(arch, expected):
    """transformers 5 gives SDPA native GQA and is_causal where it can (left alone); a sliding
    window arrives as a mask tensor, which the kernel runs natively."""
    model = tiny_model(arch, attn_implementation="sdpa")
    ids = tiny_inputs(model)
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(ids).logits
        reference = float64_reference(model)(ids).logits
    report = fuser.last_report()
    assert report.counts().get("attention", 0) == expected, report
    if expected == 0:
        assert all("left to SDPA" in n.reason for n in report.near_misses if n.pattern == "attention")
    assert_close(logits, reference, torch.float32)


def test_sdpa_with_padding_is_rewritten_and_keeps_sdpa_zeros():
    """BERT under SDPA with a padding mask: key padding runs natively; a fully padded sequence's rows
    see no key and get SDPA's zeros (not NaN)."""
    model = tiny_model("bert", attn_implementation="sdpa")
    ids = tiny_inputs(model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1] = 0
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(
            ids, attention_mask=mask).logits
        original = model(ids, attention_mask=mask).logits
        reference = float64_reference(model)(ids, attention_mask=mask).logits
    report = fuser.last_report()
    assert report.counts().get("attention") == 2, report
    assert {m.mode.split(", head dim")[0] for m in report.matches if m.pattern == "attention"} == {"key padding"}
    assert original.isfinite().all()
    assert_close(logits, original, torch.float32)
    assert_close(logits, reference, torch.float32)


def test_training_with_attention_dropout_is_rewritten_with_dropout():
    model = tiny_model("llama", attention_dropout=0.25).train()
    ids = tiny_inputs(model)
    report = fuser.explain(model, ids)
    modes = [m.mode for m in report.matches if m.pattern == "attention"]
    assert len(modes) == 2 and all("dropout 0.25" in mode for mode in modes), report


def test_gpt_oss_attention_with_sinks_is_rewritten_in_training():
    """gpt-oss's eager attention (sinks, a sliding layer and a full one) under torch.compile: both layers
    rewritten; logits and every gradient, the sinks' included, against float64."""
    from fuser.models import tiny_gpt_oss

    model = tiny_gpt_oss().train()
    ids = tiny_inputs(model)
    reference = float64_reference(model)
    torch._dynamo.reset()
    fuser.reset_reports()
    loss = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(ids, labels=ids).loss
    report = fuser.last_report()
    assert report.counts().get("attention") == 2, report
    assert {m.mode.split(", GQA")[0] for m in report.matches if m.pattern == "attention"} == {
        "causal, window 8, no mask read", "causal, no mask read"}, report
    assert all("sinks" in m.mode for m in report.matches if m.pattern == "attention")
    loss.backward()
    reference(ids, labels=ids).loss.backward()
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        if p.grad is not None and p64.grad is not None:
            assert_close(p.grad, p64.grad, torch.float32), name
    assert all(layer.self_attn.sinks.grad.abs().sum() > 0 for layer in model.model.layers)


def test_t5_attention_with_its_position_bias_is_rewritten():
    """T5 (eager) adds its relative position bias, then (decoder) its causal mask: in eval all six layers
    (encoder, decoder self- and cross-attention) are rewritten, logits against float64; in training too, the
    bias then read as a tensor that takes its gradient (tests/test_attention_bias.py checks the gradients)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    config._attn_implementation = "eager"
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    decoder_ids = ids[:, :7].contiguous()
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(
            input_ids=ids, decoder_input_ids=decoder_ids).logits
        reference = float64_reference(model)(input_ids=ids, decoder_input_ids=decoder_ids).logits
    report = fuser.last_report()
    assert report.counts().get("attention") == 6, report
    assert sum("bias read as a tensor" in m.mode for m in report.matches) == 2, report
    assert_close(logits, reference, torch.float32)
    report = fuser.explain(model.train(), input_ids=ids, decoder_input_ids=decoder_ids)
    assert report.counts().get("attention") == 6, report
    assert not [n for n in report.near_misses if n.pattern == "attention"], report


def _fsmt_inputs(model, padded_decoder, left=False):
    """Source ids with sequence 0 padded after 6 tokens, decoder ids (sequence 1 padded from token 5 on, or
    `left`: its first two tokens, whose rows then see only padded keys)."""
    ids = torch.randint(3, model.config.src_vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 6:] = 0
    decoder_ids = ids[:, :7].clone()
    if padded_decoder:
        decoder_ids[1, slice(None, 2) if left else slice(5, None)] = model.config.pad_token_id
    return dict(input_ids=ids, attention_mask=attention_mask, decoder_input_ids=decoder_ids)


_FSMT_TWO_TERMS = ("a bias and a mask applied by masked_fill while the scores take a gradient: in the one added mask "
                   "the kernel takes, a row the mask hides entirely would pass its filled scores a gradient "
                   "(masked_fill passes none); folded only where q and k take no gradient (eval, inference)")


@pytest.mark.parametrize("padded_decoder", [False, True])
def test_fsmt_in_training_rewrites_every_attention_but_the_two_term_decoder_masks(monkeypatch, padded_decoder):
    """FSMT over batched heads, in training: the encoder's padding masked_fill, the decoder's added causal mask,
    the cross-attention's encoder padding: all six sites rewritten, loss and every gradient against float64.
    With padded decoder tokens the decoder's self-attention adds its causal mask (read as a tensor: built by
    fill_ and triu) and then masked_fills the padding with finfo.min. Folded into the one added mask the kernel
    takes, a decoder row whose visible keys are all padded (left padding) would give q and k a gradient through
    the filled scores, which masked_fill cuts: in training those two sites are near misses saying so, and keep
    the original (in eval they are rewritten: the next test)."""
    from transformers.models.fsmt import modeling_fsmt

    from fuser.models import tiny_fsmt

    model = tiny_fsmt().train()
    pristine = copy.deepcopy(model)
    inputs = _fsmt_inputs(model, padded_decoder)
    inputs["labels"] = inputs["decoder_input_ids"]
    torch._dynamo.reset()
    fuser.reset_reports()
    loss = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(**inputs).loss
    report = fuser.last_report()
    near_misses = [n.reason for n in report.near_misses if n.pattern == "attention"]
    assert report.counts().get("attention") == (4 if padded_decoder else 6), report
    assert near_misses == ([_FSMT_TWO_TERMS] * 2 if padded_decoder else []), report
    loss.backward()
    # transformers' fill_with_neg_inf casts finfo(float64).min to float32 (overflow): the float64 run fills with
    # float32's min, an excluded score either way
    monkeypatch.setattr(modeling_fsmt, "fill_with_neg_inf", lambda t: t.fill_(torch.finfo(torch.float32).min))
    reference, own = float64_reference(model), copy.deepcopy(model)
    loss64 = reference(**inputs).loss
    loss64.backward()
    own(**inputs).loss.backward()
    assert_close(loss, loss64, torch.float32)
    # k_proj's bias has a zero gradient (a row's scores shift together), float32 rounding alone: held, as every
    # door holds it, to twice the original's own error there, or to the worst of that on parameters an ulp away

    def measure(seed):
        near = copy.deepcopy(pristine)
        with torch.no_grad():
            for p, moved in zip(near.parameters(), nudged(dict(near.named_parameters()), (), seed).values()):
                p.copy_(moved)
        near64 = float64_reference(near)
        near(**inputs).loss.backward()
        near64(**inputs).loss.backward()
        return {name: (p64.grad, p.grad) for (name, p), p64 in zip(near.named_parameters(), near64.parameters())}

    want = {name: p64.grad for (name, _), p64 in zip(model.named_parameters(), reference.parameters())}
    floors = functools.cache(lambda: neighbour_floors(measure, want))
    for (name, p), p64, p32 in zip(model.named_parameters(), reference.parameters(), own.parameters()):
        if p64.grad is not None:
            verdict = judge(p.grad, p64.grad, own=p32.grad, attainable=lambda: floors()[name])
            assert verdict.problem is None, (name, verdict)


@pytest.mark.parametrize("left", [False, True])
def test_fsmt_in_eval_without_cache_has_its_two_term_decoder_masks_folded(monkeypatch, left):
    """FSMT in eval with use_cache off and padded decoder tokens: the decoder's self-attention adds its causal
    mask and masked_fills the padding (finfo.min, a fill the kernel hides); no gradient reaches the scores, so the
    two terms fold into one added mask: all six sites rewritten, logits against float64 (left padding too: rows
    that see only padded keys average V over them on both sides)."""
    from transformers.models.fsmt import modeling_fsmt

    from fuser.models import tiny_fsmt

    model = tiny_fsmt()
    inputs = dict(_fsmt_inputs(model, padded_decoder=True, left=left), use_cache=False)
    torch._dynamo.reset()
    fuser.reset_reports()
    with torch.no_grad():
        logits = torch.compile(model, backend="fuser", options={"codegen": "eager", "strict": True})(**inputs).logits
        report = fuser.last_report()
        # as in training: the float64 run fills its causal mask with float32's min (transformers' overflows to -inf)
        monkeypatch.setattr(modeling_fsmt, "fill_with_neg_inf", lambda t: t.fill_(torch.finfo(torch.float32).min))
        reference, own = float64_reference(model)(**inputs).logits, model(**inputs).logits
    assert report.counts().get("attention") == 6, report
    assert not [n for n in report.near_misses if n.pattern == "attention"], report
    assert sum("bias and mask folded into one tensor" in m.mode for m in report.matches) == 2, report
    if left:  # rows that see only padded keys: float64 fills those with float64's min, below the causal mask's
        torch.testing.assert_close(logits, own)  # float32 min, so its softmax there differs: held to float32's
        assert rel_l2(own, reference) > 1e-4  # (the original's own float32 run differs so from float64)
    else:
        assert_close(logits, reference, torch.float32)
