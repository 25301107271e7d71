"""The `fuser` logger under torch's logging switches: what the backend decided while compiling, one line each."""
import os
import subprocess
import sys

import pytest
from torch._logging._internal import log_registry

import fuser  # noqa: F401  (registers the "fuser" log)

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
    stderr = _stderr(tmp_path)
    assert "rewrote" not in stderr and "near miss" not in stderr, stderr
