#!/usr/bin/env bash
# The test suite: kernels through the Triton interpreter on CPU (TRITON_INTERPRET=1 is set by
# tests/conftest.py when there is no GPU), patterns, engine and tiny HF models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
