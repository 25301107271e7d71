"""Every gated delta launch compiles for the H200 (sm90) and fits its shared memory, checked on a machine without a
GPU (scripts/compile_for_gpu.py): a launch over it fails only on the GPU (it did, at head dim 128)."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_for_gpu.py"


def _run(*arguments):
    environment = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, env=environment,
                          timeout=900)


def test_gated_delta_launches_fit_the_h200():
    done = _run("gated_delta")
    assert done.returncode == 0, done.stdout + done.stderr
    sizes = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith(("ok", "OVER"))]
    assert len(sizes) >= 20 and max(sizes) > 100, done.stdout  # every kernel compiled, the scans' tiles in it
    tight = _run("gated_delta", "--shared-kb", str(max(sizes) - 1))  # compiled kernels come from Triton's cache
    assert tight.returncode == 1 and "OVER" in tight.stdout, tight.stdout + tight.stderr
