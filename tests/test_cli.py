"""The command line: each verb does its job, --help reads well, errors name the problem and the fix."""
import subprocess
import textwrap

import pytest
import torch

from fuser.cli import main
from fuser.models import ARCHITECTURES


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


@pytest.mark.parametrize("argv, message", [
    (["explain", "lama"], f"unknown architecture 'lama'; known: {', '.join(ARCHITECTURES)}; or give your own model"),
    (["explain", "nowhere.py:make"], "no file 'nowhere.py'"),
    (["explain", "model.py"], "name the function that builds the model: model.py:make_model"),
    (["demo", "lama"], "unknown architecture 'lama'"),
    (["bench", "nope"], "unknown benchmark(s) nope; known: "),
])
def test_errors_name_the_problem_and_the_fix(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_factory_without_the_function_lists_what_is_there(tmp_path, capsys):
    (tmp_path / "models.py").write_text("def build():\n    pass\n\ndef other():\n    pass\n")
    assert main(["explain", f"{tmp_path / 'models.py'}:make_model"]) == 2
    assert "has no function 'make_model'; its functions: build, other" in capsys.readouterr().err


def test_fuzz_patterns_shows_progress_and_results(capsys):
    assert main(["fuzz", "softmax", "--max-examples", "3", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "fuzz softmax: ok after 3 example(s)" in captured.out
    assert "fuzz softmax: example 3/3" in captured.err  # progress, one line per example


def test_fuzz_a_model(capsys):
    assert main(["fuzz", "gpt2", "--layers", "1", "--length", "6", "--max-examples", "2", "--seed", "0"]) == 0
    assert "fuzz GPT2LMHeadModel: ok after 2 example(s), 1 site(s)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_bench_without_a_gpu_says_so_and_fails(capsys):
    assert main(["bench"]) == 1
    assert "the benchmarks time kernels on a GPU" in capsys.readouterr().err


def test_arguments_after_double_dash_are_for_bench_only(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "llama", "--", "--sweep"])
    assert "only `fuser bench` passes arguments after --" in capsys.readouterr().err


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
