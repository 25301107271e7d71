"""Every launch compiles for the H200 (sm90), fits its shared memory and writes only its outputs, checked on a
machine without a GPU (scripts/compile_for_gpu.py): a launch over the shared memory fails only on the GPU (it did,
at head dim 128), and one that reads as writing an input is cloned per call (it was)."""
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


def test_no_launch_writes_an_input_by_inductors_analysis():
    """Inductor clones before every call each tensor it finds a traced launch storing to, and skips CUDA graphs
    for a graph that mutates its input: every launch of the attention, MLA, MoE, RMSNorm and softmax kernels must
    read as writing only its outputs (the attention forward once read as writing q, k, v and the KV cache)."""
    done = _run("rows", "attention", "moe")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    analysed = [line for line in done.stdout.splitlines() if " writes [" in line]
    assert len(analysed) >= 30, done.stdout  # the analysis ran (this torch has it) on every kernel
    assert any("_attention_forward_kernel" in line and "writes ['Out', 'Stats']" in line for line in analysed)
