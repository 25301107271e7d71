"""The command line: each verb does its job, --help reads well, errors name the problem and the fix."""
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest
import torch

import fuser
from fuser import cli
from fuser.cli import main
from fuser.kernels.runtime import what_runs
from fuser.models import ARCHITECTURES
from fuser.patterns import BY_NAME


def test_explain_an_architecture_with_html(tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["explain", "llama", "--layers", "1", "--length", "7", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "fuser: 4 rewrite(s)" in out and "model.layers.0.self_attn" in out and f"wrote {page}" in out
    assert page.read_text().count("<section class='region'") == 4


def test_explain_a_users_factory(tmp_path, capsys):
    (tmp_path / "my_model.py").write_text(textwrap.dedent("""
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(32))

            def forward(self, x):
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.scale
                return torch.softmax(x @ x.transpose(-1, -2), dim=-1)

        def make_model():
            return Block(), torch.randn(2, 6, 32)
    """))
    assert main(["explain", f"{tmp_path / 'my_model.py'}:make_model"]) == 0
    out = capsys.readouterr().out
    assert "fuser: 2 rewrite(s)" in out and "my_model.py" in out


def _no_work(*args, **kwargs):
    raise AssertionError("a mistake in the arguments must be found before any work is done")


@pytest.mark.parametrize("argv, message", [
    (["explain", "lama"], f"unknown architecture 'lama'; known: {', '.join(ARCHITECTURES)}; or give your own model"),
    (["explain", "nowhere.py:make"], "no file 'nowhere.py'"),
    (["explain", "model.py"], "name the function that builds the model: model.py:make_model"),
    (["demo", "lama"], "unknown architecture 'lama'"),
    (["demo", "my_model.py:make"], "the demo builds one of these; fuser explain and fuser fuzz also take your own model"),
    (["bench", "nope"], "unknown benchmark(s) nope; known: "),
    (["explain", "llama", "--", "--sweep"], "only `fuser bench` passes arguments after --"),
    (["fuzz", "attention", "--max-examples", "0"], "argument --max-examples: give a whole number of at least 1, not '0'"),
    (["explain", "llama", "--length", "0"], "argument --length: give a whole number from 1 to 128, not '0'"),
    (["demo", "--length", "129"], "argument --length: give a whole number from 1 to 128, not '129'"),
    (["demo", "--layers", "two"], "argument --layers: give a whole number of at least 1, not 'two'"),
    (["explain", "llama", "--html", "/nonexistent/dir/r.html"],
     "argument --html: there is no directory '/nonexistent/dir' to write r.html in; create it or give another path"),
    (["explain", "llama", "--html", "/"], "argument --html: / is a directory; give a file name in it"),
    (["fuzz", "nosuchpattern"], f"unknown pattern or architecture 'nosuchpattern'; patterns: {', '.join(BY_NAME)}; "
                                f"architectures: {', '.join(ARCHITECTURES)}; or give your own model"),
    (["fuzz", "softmax", "nosuch.py:make"], "no file 'nosuch.py'"),  # found before softmax is fuzzed
    (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate (see fuser --help)"),
])
def test_mistakes_are_one_line_saying_what_to_do_before_any_work(argv, message, capsys, monkeypatch):
    for name in ("explain", "fuzz"):
        monkeypatch.setattr(fuser, name, _no_work)
    monkeypatch.setattr(torch, "compile", _no_work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
@pytest.mark.parametrize("verb", ["demo", "explain", "fuzz"])
def test_device_cuda_without_cuda_says_so(verb, capsys):
    assert main([verb, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"fuser {verb}: error: --device cuda: this torch ({torch.__version__}) " in err
    assert "leave --device out (or give --device cpu) to run on the CPU" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["demo"], ["explain", "gpt2"], ["fuzz", "softmax", "llama"]])
def test_architectures_without_transformers_say_how_to_install_it(argv, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    monkeypatch.setattr(fuser, "fuzz", _no_work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    pin = tomllib.loads(pathlib.Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    wanted = pin["project"]["optional-dependencies"]["hf"][0]  # the extra's one requirement, as pyproject spells it
    assert "transformers, which is not installed here; pip install 'transformers" in err and err.count("\n") == 1
    assert all(part in err for part in wanted.removeprefix("transformers").split(",")), (wanted, err)


def test_bench_from_an_installed_wheel_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path)  # a wheel has no benchmarks/
    assert main(["bench"]) == 2
    assert "the benchmarks are the scripts in benchmarks/ of a source checkout" in capsys.readouterr().err


def test_demo_says_what_ran_the_error_and_its_bound(capsys):
    assert main(["demo", "--layers", "1", "--length", "5", "--codegen", "eager", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "fuser demo: a tiny llama (1 layer, float32, cpu)" in captured.out
    assert f"the fused ops ran as {what_runs('cpu')}\n" in captured.out
    found = re.search(r"logits vs the same model in float64: relative L2 error (\S+), bound 1e-05 "
                      r"\(float32, or twice the uncompiled model's (\S+)\): OK", captured.out)
    assert found and float(found[1]) <= 1e-5 and float(found[2]) <= 1e-5, captured.out
    # progress on stderr, each step with its time
    assert re.search(r"fuser: compiling with backend='fuser' \(codegen=eager\) and running it: \d+\.\d s",
                     captured.err), captured.err


def test_a_factory_without_the_function_lists_what_is_there(tmp_path, capsys):
    (tmp_path / "models.py").write_text("def build():\n    pass\n\ndef other():\n    pass\n")
    assert main(["explain", f"{tmp_path / 'models.py'}:make_model"]) == 2
    assert "has no function 'make_model'; its functions: build, other" in capsys.readouterr().err


def test_fuzz_patterns_shows_progress_and_results(capsys):
    assert main(["fuzz", "softmax", "--max-examples", "3", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "fuzz softmax: ok after 3 example(s), every error within its bound" in captured.out
    assert re.search(r"^  softmax\.out +\d\.\de-\d\d  <= 2\.0e-02$", captured.out, re.M), captured.out  # error, bound
    assert "fuzz softmax: example 3/3 ok" in captured.err  # progress, one line per example off a terminal
    counters = [(int(a), int(b)) for a, b in re.findall(r"example (\d+)/(\d+)", captured.err)]
    assert counters == [(1, 3), (2, 3), (3, 3)], captured.err
    assert "tensor(" not in captured.err + captured.out  # no example is printed when nothing fails


def test_fuzz_a_model(capsys):
    assert main(["fuzz", "gpt2", "--layers", "1", "--length", "6", "--max-examples", "2", "--seed", "0"]) == 0
    assert "fuzz GPT2LMHeadModel: ok after 2 example(s), 1 site(s)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_bench_without_a_gpu_says_so_and_fails(capsys):
    assert main(["bench"]) == 1
    assert "the benchmarks time kernels on a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("verb, mentions", [("demo", "ARCH"), ("explain", "file.py:make_model"),
                                            ("fuzz", "pattern names"), ("bench", "fuser bench norm_softmax -- --sweep")])
def test_help_reads_well(verb, mentions, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert exit_code.value.code == 0 and out.startswith(f"usage: fuser {verb}")
    assert mentions in " ".join(out.split())


def test_the_fuser_command_is_installed():
    run = subprocess.run(["fuser", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "{demo,explain,fuzz,bench}" in run.stdout
