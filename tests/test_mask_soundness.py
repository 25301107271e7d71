"""Soundness of mask and literal recognition (issue 13): a mask edited after it is built, or built
with arguments the recognizer must read (a step, a keyword start), is either modeled exactly or read
as a tensor; never taken for the mask it resembles. Each case is compiled with backend="fuser" and
compared with float64 eager, and what was recognized is asserted."""
import pytest
import torch

from helpers import compile_and_run
from numerics import assert_close

B, H, L, D = 2, 2, 12, 8
INF = float("-inf")


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, D, generator=g) for _ in range(3))


def _scores(q, k):
    return q @ k.transpose(-2, -1) * 0.3


def _attention(apply):
    """Attention whose scores meet a mask built first (as `mask()` builds it) as `apply` says."""
    def with_mask(mask):
        def fn(q, k, v):
            m = mask()
            return torch.softmax(apply(_scores(q, k), m), -1) @ v
        return fn
    return with_mask


_dropping = _attention(lambda s, m: s.masked_fill(m, INF))  # True = masked
_keeping = _attention(lambda s, m: torch.where(m, s, INF))   # True = kept
_adding = _attention(lambda s, m: s + m)


def _prefix_lm():
    m = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    m[:, :4] = False
    return m


def _tril_edited():
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    m[8:, :4] = False
    return m


def _additive_edited():
    m = torch.triu(torch.full((L, L), INF), 1)
    m[:, 1] = INF
    return m


def _eye_filled():
    m = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    m.masked_fill_(torch.eye(L, dtype=torch.bool), True)
    return m


def _diagonal_filled():
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    m.fill_diagonal_(False)
    return m


def _stepped():
    return torch.arange(0, 2 * L, 2)[:, None] >= torch.arange(L)[None, :]


def _keyword_start():
    return torch.arange(L)[:, None] >= torch.arange(start=4, end=L + 4)[None, :]


def _positional_start():
    return torch.arange(L)[:, None] >= torch.arange(4, L + 4)[None, :]


def _all_masked():
    return torch.ones(L, L, dtype=torch.bool)


# the findings of issue 13: each was rewritten as "causal, no mask read" (or "no mask") before
FINDINGS = {
    "prefix-LM edit of a triu mask": _dropping(_prefix_lm),
    "tril edited under where": _keeping(_tril_edited),
    "additive triu(full(-inf)) edited": _adding(_additive_edited),
    "masked_fill_ of the diagonal": _dropping(_eye_filled),
    "fill_diagonal_": _keeping(_diagonal_filled),
    "arange with a step": _keeping(_stepped),
    "arange with a keyword start": _keeping(_keyword_start),
    "arange with a positional start": _keeping(_positional_start),
    "masked_fill of ones: every score masked": _dropping(_all_masked),
}


def _check(fn, mode, inputs=None):
    inputs = inputs or _qkv()
    out, report = compile_and_run(fn, *inputs, options={"strict": True})
    assert_close(out, fn(*(t.double() for t in inputs)), torch.float32)
    assert report.counts() == {"attention": 1}, report
    assert report.matches[0].mode.startswith(mode), report.matches[0].mode
    return out


@pytest.mark.parametrize("case", FINDINGS)
def test_masks_the_recognizer_cannot_reduce_are_read_as_tensors(case):
    _check(FINDINGS[case], "mask read as a tensor")


def test_a_mask_of_ones_under_masked_fill_is_nan_everywhere_as_the_original():
    assert _check(FINDINGS["masked_fill of ones: every score masked"], "mask read as a tensor").isnan().all()


def _in_place_tril():
    m = torch.ones(L, L, dtype=torch.bool)
    m.tril_()
    return m


def _edit_of_nothing():
    m = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    m[:, :0] = False  # an empty region: the mask stays causal
    return m


def _arange_into_a_buffer():
    positions = torch.empty(L, dtype=torch.int64)
    torch.arange(L, out=positions)
    return positions[None, :] <= positions[:, None]


def _clone_edited():
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    copy = m.clone()
    copy[:, :4] = False  # the copy is written, m is not
    return m


def _keyword_starts_on_both_axes():
    return torch.arange(start=4, end=L + 4)[:, None] >= torch.arange(start=4, end=L + 4)[None, :]


def _stepped_on_both_axes():
    return torch.arange(0, 2 * L, 2)[:, None] - torch.arange(0, 2 * L, 2)[None, :] >= 0


# writes and arguments modeled exactly keep the kernel's native mode
MODELED = {
    "in-place tril_ of ones": (_keeping(_in_place_tril), "causal, no mask read"),
    "a setitem of an empty slice": (_dropping(_edit_of_nothing), "causal, no mask read"),
    "arange(out=) into an empty buffer": (_keeping(_arange_into_a_buffer), "causal, no mask read"),
    "a write into a clone": (_keeping(_clone_edited), "causal, no mask read"),
    "keyword starts on both axes": (_keeping(_keyword_starts_on_both_axes), "causal, no mask read"),
    "steps on both axes": (_keeping(_stepped_on_both_axes), "causal, no mask read"),
    "tril | eye": (_keeping(lambda: torch.tril(torch.ones(L, L, dtype=torch.bool)) | torch.eye(L, dtype=torch.bool)),
                   "causal, no mask read"),
}


@pytest.mark.parametrize("case", MODELED)
def test_writes_and_arguments_modeled_exactly_keep_the_native_mode(case):
    fn, mode = MODELED[case]
    _check(fn, mode)


def _written_through_a_view():
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    m.view(-1)[5] = True  # row 0, key 5: a key in the future
    return m


def _view_made_before_the_write():
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    view = m[None, None]
    m[:, :4] = False  # the view made before sees it
    return view


def _written_after_the_read(q, k, v):
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    s = torch.where(m, _scores(q, k), INF)
    m[:, :4] = False  # after the scores read it: the original is causal
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("fn", [_keeping(_written_through_a_view), _keeping(_view_made_before_the_write)],
                         ids=["a write through a view", "a view made before the write"])
def test_writes_through_aliases_make_the_mask_a_tensor(fn):
    _check(fn, "mask read as a tensor")


def test_a_mask_edited_while_the_scores_are_computed_is_read_after_the_edit():
    """The edit comes after the match's first node but before the mask is read: the site is rewritten
    with the edited mask (read as a tensor)."""
    def fn(q, k, v):
        s = _scores(q, k)
        return torch.softmax(s.masked_fill(_prefix_lm(), INF), -1) @ v

    _check(fn, "mask read as a tensor")


def test_a_write_after_the_mask_is_read_does_not_change_what_the_original_computed():
    q, k, v = _qkv()
    out, report = compile_and_run(_written_after_the_read, q, k, v, options={"strict": True})
    assert_close(out, _written_after_the_read(q.double(), k.double(), v.double()), torch.float32)
    assert "attention" not in report.counts(), report  # the mask is written while the match reads it
    assert any("modified in place" in n.reason for n in report.near_misses), report


def test_dropout_with_train_false_is_no_dropout():
    """`torch.dropout(x, p, train=False)` names its flag `train`: it was read as training=True."""
    def fn(q, k, v):
        return torch.dropout(torch.softmax(_scores(q, k), -1), 0.5, train=False) @ v

    out = _check(fn, "no mask")
    assert "dropout" not in compile_and_run(fn, *_qkv())[1].matches[0].mode
    assert out.isfinite().all()


def test_sdpa_scale_computed_in_the_graph_is_given_to_the_op_at_run_time():
    """With dynamic shapes `scale=q.shape[-1] ** -0.5` is a SymFloat node: the op takes it at run time, so a call
    with another head dim computes with that call's scale."""
    import torch.nn.functional as F

    import fuser

    def repeated(x):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, repeated(k), repeated(v), scale=q.shape[-1] ** -0.5)

    q, k, v = _qkv()
    q, k, v = q[:, :, :1], k[:, :1], v[:, :1]  # one query (a size Dynamo specializes), one key/value head
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(fn, backend="fuser", options={"codegen": "eager"}, dynamic=True)
    out = compiled(q, k, v)
    assert_close(out, fn(q.double(), k.double(), v.double()), torch.float32)
    report = fuser.last_report()
    assert report.counts() == {"attention": 1} and "scale symbolic" in report.matches[0].mode, report
    q, k, v = (t[..., :5].contiguous() for t in (q, k, v))  # head dim 5: scale 5 ** -0.5
    assert_close(compiled(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32)


def _writes(x, y):
    a = x & y                                   # operator.and_: a new tensor
    x &= y                                      # operator.iand: into x
    torch.ge(y, False, out=a)                   # into a
    z = x.float()
    torch.nn.functional.relu(z, inplace=True)   # into z
    torch.nn.functional.dropout(z, 0.0, True, True)  # into z, inplace given positionally
    return a, z


def test_written_names_every_tensor_a_node_writes_into():
    from fuser.patterns.nodes import written
    from helpers import captured_graphs

    (gm, _), = captured_graphs(_writes, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))
    writes = {node.name: [t.name for t in written(node)] for node in gm.graph.nodes}
    assert writes == {"l_x_": [], "l_y_": [], "a": [], "x": ["l_x_"], "ge": ["a"], "z": [], "relu": ["z"],
                      "dropout": ["z"], "output": []}, writes
