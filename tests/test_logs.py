"""The `fuser` logger under torch's logging switches: what the backend decided while compiling, one line each; and
the progress of long steps on stderr, on a terminal only, unless the logging says otherwise."""
import contextlib
import io
import logging
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from torch._logging._internal import log_registry

import fuser  # noqa: F401  (registers the "fuser" log)
from fuser.kernels.runtime import autotune
from fuser.logs import PROGRESS

# one softmax the backend rewrites, one over another dim that it must leave alone (a near miss)
COMPILE = """
import torch
{switch}
def two_softmaxes(x):
    return torch.softmax(x, dim=-1) + torch.softmax(x, dim=0)
torch.compile(two_softmaxes, backend="fuser", options={{"codegen": "eager"}})(torch.randn(4, 5))
"""
SET_LOGS = 'import logging, fuser; torch._logging.set_logs(modules={"fuser": logging.INFO})'


def _stderr(folder, switch: str = "", torch_logs: str | None = None) -> str:
    script = folder / "two_softmaxes.py"
    script.write_text(COMPILE.format(switch=switch))
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    env.update({"TORCH_LOGS": torch_logs} if torch_logs is not None else {})
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


def test_fuser_is_a_registered_torch_log():
    assert log_registry.is_log("fuser") and "fuser" in log_registry.log_alias_to_log_qnames["fuser"]


@pytest.mark.parametrize("switch, torch_logs", [("", "fuser"), (SET_LOGS, None)], ids=["TORCH_LOGS", "set_logs"])
def test_each_rewrite_and_near_miss_is_one_line(switch, torch_logs, tmp_path):
    lines = [line for line in _stderr(tmp_path, switch, torch_logs).splitlines() if "fuser/engine/rewriter.py" in line]
    assert len(lines) == 2, lines
    rewrite, = [line for line in lines if "rewrote" in line]
    miss, = [line for line in lines if "near miss" in line]
    assert "g0.m0: rewrote softmax at <top> (two_softmaxes.py:5)" in rewrite and "into fuser::softmax (float32" in rewrite
    assert "near miss: softmax at <top> (two_softmaxes.py:5)" in miss and "left as it was: softmax over dim -2" in miss


def test_silent_unless_asked_for(tmp_path):
    stderr = _stderr(tmp_path)  # a pipe, not a terminal: no progress either
    assert "rewrote" not in stderr and "near miss" not in stderr and "fuser: graph" not in stderr, stderr


@contextlib.contextmanager
def _terminal():
    """sys.stderr on a pseudo-terminal; yields a function returning what was written there since it last asked."""
    main, side = os.openpty()
    os.set_blocking(main, False)
    with os.fdopen(side, "w") as tty, contextlib.redirect_stderr(tty):
        def written() -> str:
            tty.flush()
            try:
                return os.read(main, 1 << 16).decode()
            except BlockingIOError:
                return ""
        yield written
    os.close(main)


def _compile_two_softmaxes(length: int) -> None:
    torch._dynamo.reset()
    def two_softmaxes(x):
        return torch.softmax(x, dim=-1) + torch.softmax(x, dim=0)
    torch.compile(two_softmaxes, backend="fuser", options={"codegen": "eager"})(torch.randn(4, length))


def test_compiling_shows_progress_on_a_terminal_and_nowhere_else():
    with _terminal() as written:
        _compile_two_softmaxes(5)
        shown = written()
    assert "fuser: graph" in shown and ": rewriting ..." in shown and shown.endswith("\r\x1b[K"), repr(shown)
    with contextlib.redirect_stderr(io.StringIO()) as file:  # not a terminal
        _compile_two_softmaxes(6)
    assert file.getvalue() == ""


def test_progress_is_quiet_where_the_logging_says_so():
    level = PROGRESS.level
    PROGRESS.setLevel(logging.WARNING)
    try:
        with _terminal() as written:
            _compile_two_softmaxes(7)
            assert written() == ""
    finally:
        PROGRESS.setLevel(level)


def _once(call, quantiles):
    """A benchmark of one run, each candidate timed alike (the interpreter has no timer worth reading)."""
    call()
    return [1.0, 1.0, 1.0]


@autotune([triton.Config({"BLOCK": block}) for block in (16, 32, 64)], key=["n"], do_bench=_once)
@triton.jit
def _double(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs a Triton kernel: a GPU or the interpreter")
def test_tuning_shows_each_candidate_it_benchmarks_once_per_key():
    x = torch.ones(50, device="cuda" if torch.cuda.is_available() else "cpu")
    with _terminal() as written:
        _double[lambda meta: (triton.cdiv(50, meta["BLOCK"]),)](x, 50)
        shown = written()
        _double[lambda meta: (triton.cdiv(50, meta["BLOCK"]),)](x, 50)  # the key is tuned: nothing to say
        again = written()
    assert "fuser: tuning _double: candidate 1 of 3 [######..............]" in shown, repr(shown)
    assert "candidate 2 of 3 [#############.......]" in shown and shown.endswith("\r\x1b[K"), repr(shown)
    assert again == "", repr(again)
