"""The engine: one pattern covers every spelling, near misses are left alone and explained,
unsafe sites are kept, failures never break a model, options are checked."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import fuser
from fuser import backend as fuser_backend_module, options as fuser_options
from fuser.patterns import PATTERNS
from fuser.patterns.norms import RMS_NORM
from fuser.engine.rewriter import RewriteError, rewrite
from helpers import captured_graphs, compile_and_run
from numerics import assert_close

SOFTMAX_SPELLINGS = {
    "method": lambda x: x.softmax(-1),
    "functional": lambda x: F.softmax(x, dim=-1),
    "torch": lambda x: torch.softmax(x, 2),
    "upcast": lambda x: F.softmax(x.float(), dim=-1).to(x.dtype),
    "dtype_kwarg": lambda x: F.softmax(x, dim=-1, dtype=torch.float32).type_as(x),
    "nn_module": torch.nn.Softmax(dim=-1),
}


@pytest.mark.parametrize("spelling", SOFTMAX_SPELLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_softmax_spelling_is_one_match(spelling, dtype):
    x = torch.randn(3, 5, 37).to(dtype)
    fn = SOFTMAX_SPELLINGS[spelling]
    out, report = compile_and_run(fn, x, options={"strict": True})
    assert report.counts() == {"softmax": 1}
    assert_close(out, fn(x.double()), dtype)


def llama_norm(x, w, eps=1e-6):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


RMS_NORM_SPELLINGS = {
    "llama": llama_norm,
    "gemma": lambda x, w: (lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))(x.float())
    .mul(1.0 + w.float()).type_as(x),
    "olmo2": lambda x, w: (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))).to(x.dtype),
    "square_and_div_sqrt": lambda x, w: w * (x / torch.sqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + 1e-6)),
    "x_times_x_no_weight": lambda x, w: x * (x * x).mean(dim=(-1,), keepdim=True).add(1e-6).rsqrt(),
    "power_operator": lambda x, w: (x.float() * torch.rsqrt((x.float() ** 2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w,
}


@pytest.mark.parametrize("spelling", RMS_NORM_SPELLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_rms_norm_spelling_is_one_match(spelling, dtype):
    x, w = torch.randn(2, 7, 48).to(dtype), (1 + 0.1 * torch.randn(48)).to(dtype)
    fn = RMS_NORM_SPELLINGS[spelling]
    out, report = compile_and_run(fn, x, w, options={"strict": True})
    assert report.counts() == {"rms_norm": 1}, report
    assert_close(out, fn(x.double(), w.double()), dtype)


NEAR_MISSES = {
    # name: (function, the reason the report must give (None: nothing should even match), rewrites left)
    "softmax over dim 1": (lambda x, w: torch.softmax(x, dim=1), "softmax over dim -2", {}),
    "norm over another dim": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6), "mean over dim -2", {}),
    "mean over two dims": (lambda x, w: x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6), "mean over dim", {}),
    "missing eps": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)), None, {}),
    "a cube, not a square": (lambda x, w: x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True) + 1e-6), None, {}),
    # the norm is fused, the product with an activation (not a weight vector) stays outside it
    "multiplier of the wrong shape": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x,
                                      "is not a weight of shape [48]", {"rms_norm": 1}),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_explained(case):
    fn, reason, rewrites = NEAR_MISSES[case]
    torch.manual_seed(0)  # a cube's mean can cancel: fixed inputs, not the luck of the draw
    x, w = torch.randn(2, 7, 48), torch.randn(48)
    out, report = compile_and_run(fn, x, w, options={"strict": True})
    assert report.counts() == rewrites, report
    if reason is not None:
        assert any(reason in n.reason for n in report.near_misses), report
    assert_close(out, fn(x.double(), w.double()), torch.float32)


def test_a_value_used_outside_the_match_keeps_the_site():
    def norm_and_variance(x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + 1e-6), variance

    x = torch.randn(4, 32)
    (out, variance), report = compile_and_run(norm_and_variance, x)
    assert report.counts() == {}
    assert any("used outside" in n.reason for n in report.near_misses), report
    torch.testing.assert_close(out, norm_and_variance(x)[0])


def test_an_input_modified_inside_the_match_keeps_the_site():
    def norm_with_mutation(x):
        variance = x.pow(2).mean(-1, keepdim=True)
        x.mul_(2)
        return x * torch.rsqrt(variance + 1e-6)

    x = torch.randn(4, 32)
    out, report = compile_and_run(norm_with_mutation, x.clone())
    assert report.counts() == {}
    assert any("modified in place" in n.reason for n in report.near_misses), report
    torch.testing.assert_close(out, norm_with_mutation(x.clone()))


def _broken(pattern, **changes):
    return dataclasses.replace(pattern, **changes)


def test_a_pattern_that_raises_leaves_its_site_and_strict_raises():
    def boom(m):
        raise ValueError("planted failure")

    gm, inputs = captured_graphs(llama_norm, torch.randn(3, 16), torch.randn(16))[0]
    gm, report = rewrite(gm, [_broken(RMS_NORM, replace=boom)])
    assert report.counts() == {} and "planted failure" in report.near_misses[0].reason
    x, w = torch.randn(3, 16), torch.randn(16)
    torch.testing.assert_close(gm(x, w)[0], llama_norm(x, w))

    gm, inputs = captured_graphs(llama_norm, torch.randn(3, 16), torch.randn(16))[0]
    with pytest.raises(RewriteError, match="planted failure"):
        rewrite(gm, [_broken(RMS_NORM, replace=boom)], strict=True)


def test_verify_catches_a_planted_wrong_kernel(monkeypatch):
    def wrong(m):
        return torch.ops.fuser.rms_norm(m["x"], m.get("weight"), float(m["eps"]) * 1e4, 0.0, True,
                                        m.output.meta["example_value"].dtype)

    monkeypatch.setattr(fuser_options, "PATTERNS", tuple(
        _broken(p, replace=wrong) if p.name == "rms_norm" else p for p in PATTERNS))
    x, w = torch.randn(3, 16) * 0.01, torch.randn(16)
    out, report = compile_and_run(llama_norm, x, w, options={"verify": True})
    assert report.counts() == {}
    assert any("verification failed" in n.reason for n in report.near_misses), report
    torch.testing.assert_close(out, llama_norm(x, w))
    with pytest.raises(Exception, match="verification failed"):
        compile_and_run(llama_norm, x, w, options={"verify": True, "strict": True})


def test_verify_accepts_the_real_kernels():
    x, w = torch.randn(3, 16), torch.randn(16)
    out, report = compile_and_run(llama_norm, x, w, options={"verify": True, "strict": True})
    assert report.counts() == {"rms_norm": 1}


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(Exception, match=r"unknown option\(s\) 'fast'.*codegen, patterns, strict, verify"):
        torch.compile(lambda x: x.softmax(-1), backend="fuser", options={"fast": True})(torch.randn(3))
    with pytest.raises(Exception, match="unknown pattern"):
        torch.compile(lambda x: x.softmax(-1), backend="fuser", options={"patterns": ["nope"]})(torch.randn(3))


def test_patterns_option_selects():
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    out, report = compile_and_run(lambda x, w: llama_norm(x, w).softmax(-1), x, w, options={"patterns": ["softmax"]})
    assert report.counts() == {"softmax": 1}


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_codegen_and_mode(mode):
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    torch._dynamo.reset()
    fuser.reset_reports()
    out = torch.compile(lambda x, w: llama_norm(x, w).softmax(-1), backend="fuser", mode=mode)(x, w)
    assert fuser.last_report().counts() == {"rms_norm": 1, "softmax": 1}
    assert_close(out, llama_norm(x.double(), w.double()).softmax(-1), torch.float32)


def test_report_names_module_and_line():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x):
            return llama_norm(x, self.weight)

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), Block())
    report = fuser.explain(model, torch.randn(2, 16))
    (match,) = report.matches
    assert match.pattern == "rms_norm" and match.op == "fuser::rms_norm"
    assert match.where.module == "1" and match.where.location.endswith(f"test_engine.py:{_line_of_norm()}")
    assert "rms_norm" in str(report) and "eps=1e-06" in str(report)


def _line_of_norm() -> int:
    import inspect
    lines, start = inspect.getsourcelines(llama_norm)
    return start + next(i for i, line in enumerate(lines) if "return" in line)


def test_dynamic_shapes_do_not_recompile_per_length():
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(llama_norm, backend="fuser", options={"codegen": "eager"})
    for length in (5, 7, 9, 13, 17):
        x = torch.randn(2, length, 16)
        assert_close(compiled(x, w), llama_norm(x.double(), w.double()), torch.float32)
    counts = [r.counts() for r in fuser_backend_module._reports]
    assert len(counts) <= 2 and all(c == {"rms_norm": 1} for c in counts), counts


def test_hypothesis_fuzz_catches_a_wrong_kernel(monkeypatch):
    from fuser.patterns import BY_NAME
    from fuser.patterns.softmax import SOFTMAX

    def wrong(m):
        return torch.ops.fuser.softmax(m["x"] * 1.01, m.output.meta["example_value"].dtype)

    monkeypatch.setitem(BY_NAME, "softmax", _broken(SOFTMAX, replace=wrong))
    monkeypatch.setattr(fuser_options, "BY_NAME", BY_NAME)
    monkeypatch.setattr(fuser_options, "PATTERNS", tuple(
        BY_NAME["softmax"] if p.name == "softmax" else p for p in PATTERNS))
    result = fuser.fuzz("softmax", max_examples=20, seed=3, grads=False)
    assert not result.ok and "relative L2 error" in result.failure and result.seed == 3


@pytest.mark.parametrize("name", [p.name for p in PATTERNS])
def test_fuzz_the_library(name):
    result = fuser.fuzz(name, max_examples=8, seed=0)
    assert result.ok, str(result)
    assert result.examples >= 8 and all(math.isfinite(e) for e in result.worst_error.values())


def test_backend_name_works_without_importing_fuser():
    import subprocess
    import sys
    code = ("import torch; f = torch.compile(lambda x: torch.softmax(x, -1), backend='fuser');"
            "print(f(torch.randn(3, 5)).sum().item());"
            "import fuser; print(fuser.last_report().counts())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "{'softmax': 1}" in out.stdout


def test_graphs_with_fused_ops_skip_the_autograd_cache():
    """AOTAutograd's cache keys a graph by its forward; a cached backward would outlive a change to a fused
    op's autograd (a stale backward once called an op with its old arguments), so such graphs skip it."""
    from torch._dynamo.utils import counters

    def scores(x):
        return torch.softmax(x @ x.transpose(-1, -2), -1)

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(2, 8, 8, requires_grad=True)
    torch.compile(scores, backend="fuser")(x).sum().backward()
    assert counters["aot_autograd"]["ok"] == 1
    assert not any(key.startswith("autograd_cache") for key in counters["aot_autograd"]), counters["aot_autograd"]


def test_float64_reference_runs_grouped_mm():
    """The float64 reference of a site evaluates `torch._grouped_mm` (whose kernels take no float64:
    model fuzzing of transformers' grouped_mm experts on the GPU failed there) as plain matmuls."""
    from torch import fx
    from fuser.numerics.float64 import run_nodes

    def experts(x, weight, offs):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)

    graph = fx.symbolic_trace(experts).graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    x, weight = torch.randn(7, 8), torch.randn(3, 16, 8)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # the middle expert gets no row
    out = run_nodes(nodes, dict(zip(placeholders, (x, weight, offs))), float64=True)
    expected = torch.cat([x[:2].double() @ weight[0].double().T, x[2:].double() @ weight[2].double().T])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected)


def test_fuzz_accepts_a_gradient_below_float64_resolution(monkeypatch):
    """A float32 softmax row [46.2, -8.8]: the exact dx is ±2.3e-24 and the kernel gives it; float64
    evaluation of the original gives [0, -2.3e-24] (its y rounds to [1, 1.3e-24]), a relative error
    of 1 that is float64's, not the kernel's. A dx 1% off on an ordinary row is still caught."""
    from fuser.fuzzing import run_example
    from fuser.kernels import softmax as softmax_kernel
    from fuser.patterns import BY_NAME
    from fuser.patterns.base import Example
    from fuser.patterns.softmax import softmax as softmax_search

    def example(values):
        return Example(softmax_search, dict(x=torch.tensor(values), compute_dtype=None, dim=-1, out_dtype=None))

    errors = run_example(BY_NAME["softmax"], example([46.229881286621094, -8.80286693572998]))
    assert errors["dx"].error == pytest.approx(1.0, rel=1e-3)  # against float64's [0, -2.3e-24]
    launch = softmax_kernel.softmax_backward_launch
    monkeypatch.setattr(softmax_kernel, "softmax_backward_launch", lambda dy, x: launch(dy, x) * 1.01)
    with pytest.raises(AssertionError, match="gradient of x"):
        run_example(BY_NAME["softmax"], example([0.3, -1.2, 2.0]))


def test_an_anchor_that_is_not_rewritten_gets_a_near_miss_with_the_matchers_reason():
    """A softmax between two matmuls whose scores go through exp (not a scale, mask or softcap) is not
    attention: the softmax alone is rewritten and attention says why it stopped."""
    def exp_scored(q, k, v, t):
        return torch.softmax((q @ k.transpose(-1, -2) * t).exp(), dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, report = compile_and_run(exp_scored, q, k, v, torch.tensor(0.3))
    assert report.counts() == {"softmax": 1}
    (miss,) = [n for n in report.near_misses if n.pattern == "attention"]
    assert miss.reason.startswith("not attention: expected matmul, found exp"), miss.reason
    torch.testing.assert_close(out, exp_scored(q, k, v, torch.tensor(0.3)))


def test_the_library_refuses_a_search_without_examples_or_anchor():
    softmax = PATTERNS[-1]
    with pytest.raises(ValueError, match="not a Search row with examples"):
        dataclasses.replace(softmax, searches=(softmax.searches[0].function,))
    with pytest.raises(ValueError, match="names no anchor"):
        dataclasses.replace(softmax, anchors=())
    from fuser.engine.rewriter import plan
    gm, _ = captured_graphs(torch.softmax, torch.randn(2, 3), -1)[0]
    with pytest.raises(ValueError, match="holds none of its anchors"):
        plan(gm, [dataclasses.replace(softmax, searches=(dataclasses.replace(softmax.searches[0],
                                                                             function=lambda x: torch.rsqrt(x)),))])


def test_where_nothing_is_rewritten_the_graph_is_dynamos_own():
    """Canonicalization is for matching: a graph with nothing to rewrite goes on exactly as Dynamo made it."""
    gm, inputs = captured_graphs(lambda x: (x / 2).softmax(0), torch.randn(3, 4))[0]
    rewritten, report = rewrite(gm, PATTERNS, inputs)
    assert rewritten is gm and report.counts() == {} and report.near_misses


def test_mask_builders_only_the_replaced_code_used_are_erased():
    def causal(q, k, v):
        future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
        return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(future, float("-inf")), dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    gm, inputs = captured_graphs(causal, q, k, v)[0]
    rewritten, report = rewrite(gm, PATTERNS, inputs)
    assert report.counts() == {"attention": 1}
    assert not [n for n in rewritten.graph.nodes if n.target in (torch.ones, "triu")], rewritten.code


def test_a_rewritten_graph_keeps_what_dynamo_tells_aotautograd():
    """AOTAutograd marks parameters static for CUDA-graph trees from Dynamo's metadata on the graph module and its
    placeholders; a rewritten copy without it would have every parameter copied at each replay."""
    seen = []

    def backend(gm, example_inputs, **_):
        rewritten, report = rewrite(gm, PATTERNS, example_inputs)
        seen.append((gm, rewritten, report))
        return rewritten.forward

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.weight = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            h = self.proj(x).float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    torch._dynamo.reset()
    torch.compile(Block(), backend=backend, dynamic=False)(torch.randn(3, 8))
    (gm, rewritten, report), = seen
    assert report.counts() == {"rms_norm": 1} and rewritten is not gm
    assert rewritten.meta["dynamo_compile_id"] == gm.meta["dynamo_compile_id"]
    assert rewritten._param_name_to_source is gm._param_name_to_source
    sources = [[getattr(n, "_dynamo_source", None) for n in g.graph.find_nodes(op="placeholder")]
               for g in (gm, rewritten)]
    assert sources[0] == sources[1] and all(s is not None for s in sources[0])
    static = [n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") for n in
              rewritten.graph.find_nodes(op="placeholder")]
    assert sum(s is not None for s in static) == 3  # the Linear's weight and bias, and the norm's weight
