#!/usr/bin/env bash
# Installs fuser and what it needs on this machine; safe to run again.
# torch is not pinned by the package (GPU machines bring their own); where none is installed,
# the CPU build 2.13.0 is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -e ".[test]"
