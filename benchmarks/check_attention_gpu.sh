#!/bin/sh
# GPU check of the kernels/attention restructure and the NaN rule (run on the H200 from the repository root):
# the tests that exercise compiled kernels and replayed launches, then the attention benchmark (RESULTS.md has the
# figures before). A failing step stops the script.
set -e
python3 -m pytest -q -x tests/test_launch.py tests/test_attention_nonfinite.py
python3 -m pytest -q -x tests/test_kernel_attention.py
python3 benchmarks/bench_attention.py --prewarm 16 --no-compile "$@"
