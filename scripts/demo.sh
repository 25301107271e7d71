#!/usr/bin/env bash
# The main job: compile a tiny HF-architecture model with backend="fuser", print what was
# rewritten, check the outputs against float64 (on the GPU when there is one, else the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m fuser demo "$@"
