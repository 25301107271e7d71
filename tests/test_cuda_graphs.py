"""options={"cudagraphs": True}: CUDA graphs with either codegen (torch.compile refuses mode= with options=).

On a CPU: the option's parsing, the error where there is no CUDA, Inductor's setting, and the eager codegen's
path through torch's cudagraphs backend (AOTAutograd forward and backward graphs with the fused ops in them;
torch skips the recording on CPU tensors). The recording and replay themselves run on a GPU:

    .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_cuda_graphs.py
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fuser
from fuser.cuda_graphs import inductor_config
from fuser.models import tiny_inputs, tiny_model
from helpers import float64_reference
from numerics import assert_close

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs: needs a GPU")


def test_the_option_is_true_or_false():
    assert fuser.Options.parse({"cudagraphs": True}).cudagraphs
    with pytest.raises(ValueError, match="fuser: cudagraphs must be True or False, not 'yes'"):
        fuser.Options.parse({"cudagraphs": "yes"})


def test_inductor_records_them_as_reduce_overhead_does():
    assert inductor_config(None, True) == {"triton.cudagraphs": True} == inductor_config("reduce-overhead", False)
    assert inductor_config("max-autotune-no-cudagraphs", True) == {
        "max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": True}
    assert inductor_config(None, False) is None and inductor_config("default", False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA")
@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_without_cuda_compiling_says_why_and_what_to_do(codegen):
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.softmax(x, -1), backend="fuser",
                             options={"codegen": codegen, "cudagraphs": True})
    with pytest.raises(Exception, match=r"records CUDA graphs, and here is (a CPU-only build of torch|no CUDA "
                                        r"device visible).*; leave the option out to compile without them"):
        compiled(torch.randn(2, 3))


def _training_step(model, ids, compiled=None):
    """The logits and the parameters' gradients of one step of `model` (run as `compiled` where given)."""
    model.zero_grad(set_to_none=True)
    logits = (model if compiled is None else compiled)(ids).logits
    logits.square().mean().backward()
    return logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_eager_codegen_runs_through_torchs_cudagraphs_backend(monkeypatch):
    """On CPU tensors torch's backend skips the recording ("cpu device") and runs the AOTAutograd graphs:
    the fused ops' forward and backward through them meet the contract against float64."""
    monkeypatch.setattr(fuser.backend, "require_cuda", lambda: None)
    torch._dynamo.reset()
    fuser.reset_reports()
    counters.clear()
    model = tiny_model("llama", layers=1)
    ids = tiny_inputs(model, length=6)
    compiled = torch.compile(model, backend="fuser", options={"codegen": "eager", "cudagraphs": True})
    logits, grads = _training_step(model, ids, compiled)
    ref_logits, ref_grads = _training_step(float64_reference(model), ids)
    assert fuser.last_report().counts() == {"attention": 1, "rms_norm": 3}
    assert counters["inductor"]["cudagraph_skips"] >= 1  # the recording was asked for, and skipped on the CPU
    assert_close(logits, ref_logits, torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32)


@needs_cuda
@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_training_steps_record_and_replay_cuda_graphs(codegen):
    """Each step's new inputs reach the replayed graphs: values and gradients as without CUDA graphs."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama", layers=2).cuda()
    copied = copy.deepcopy(model)
    graphs = torch.compile(model, backend="fuser", options={"codegen": codegen, "cudagraphs": True})
    plain = torch.compile(copied, backend="fuser", options={"codegen": codegen})
    for step in range(4):  # a warm-up, a recording, replays
        ids = tiny_inputs(model, length=12, seed=step).cuda()
        torch.compiler.cudagraph_mark_step_begin()
        logits, grads = _training_step(model, ids, graphs)
        expected_logits, expected_grads = _training_step(copied, ids, plain)
        assert_close(logits, expected_logits, torch.float32)
        for name, grad in grads.items():
            assert_close(grad, expected_grads[name], torch.float32)
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = torch._inductor.cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.new_graph_id().id >= 2  # a forward and a backward graph recorded
