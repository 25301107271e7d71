"""Program fuzzing (fuser/program_fuzzing.py): whole mask-and-attention programs compiled with
backend="fuser" compute what eager computes; a recognizer that claims too much is caught."""
import pytest
from hypothesis import settings

import fuser.patterns.attention as attention
from fuser.patterns.attention_masks import MaskPlan
from fuser.patterns.mask_reading import MaskReader
from fuser.program_fuzzing import Program, fuzz_programs, run_program


@pytest.fixture(autouse=True)
def references(monkeypatch):
    """The fused ops run their plain-torch references: what is proved here is the recognizer."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_fuzzed_programs_compute_what_eager_computes():
    result = fuzz_programs(max_examples=3 * settings.default.max_examples, seed=0)
    assert result.ok, result
    assert result.count >= 2 * settings.default.max_examples, result
    assert any("tensor" in outcome for outcome in result.outcomes), result
    assert any("no mask read" in outcome or "key padding" in outcome for outcome in result.outcomes), result


def _claims_causal(monkeypatch):
    monkeypatch.setattr(attention, "recognize", lambda *args: MaskPlan(True, 0, False, None, float("-inf")))


def _ignores_writes(monkeypatch):
    monkeypatch.setattr(MaskReader, "writes", lambda self, node, until: [])


@pytest.mark.parametrize("unsound", [_claims_causal, _ignores_writes], ids=["every mask causal", "writes ignored"])
def test_the_fuzzer_finds_an_unsound_recognizer(monkeypatch, unsound):
    unsound(monkeypatch)
    result = fuzz_programs(max_examples=3 * settings.default.max_examples, seed=0, keep_going=True)  # no shrinking
    assert not result.ok and result.failures, result


def test_a_program_edited_after_its_mask_is_built_is_compared_with_eager():
    source = ("def program(q, k, v, pad):\n"
              "    Lq, Lk = q.shape[2], k.shape[2]\n"
              "    mask = torch.triu(torch.ones(Lq, Lk, dtype=torch.bool), 1)\n"
              "    mask[:, :4] = False\n"
              "    s = q @ k.transpose(-2, -1) * 0.35\n"
              "    return torch.softmax(s.masked_fill(mask, float('-inf')), -1) @ v\n")
    outcome = run_program(Program(source, 2, 2, 2, 9, 10, 8, dynamic=True, seed=3))  # two sizes, one graph or two
    assert set(outcome.split("; ")) == {"mask read as a tensor"}, outcome
