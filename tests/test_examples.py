"""Every script in examples/ runs on CPU, in well under a minute, and says what it shows."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SAYS = {  # a line of each example's output that shows it did its job
    "compile_hf_model.py": "rewrites: {",
    "convert_and_generate.py": "save_pretrained / from_pretrained: same weights, same tokens",
    "convert_a_plain_model.py": "plain model converted: same weights, logits within the float64 contract",
    "read_a_report.py": "open ",
    "fuzz_a_pattern.py": "fuzz LlamaForCausalLM: ok",
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SAYS)


@pytest.mark.parametrize("name", sorted(SAYS))
def test_example_runs(name, tmp_path):
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert SAYS[name] in run.stdout, run.stdout[-3000:]
    assert elapsed < 60, f"{name} took {elapsed:.0f} s"
