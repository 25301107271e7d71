#!/usr/bin/env bash
# The test suite: kernels through the Triton interpreter on CPU (TRITON_INTERPRET=1 is set by
# tests/conftest.py when there is no GPU), patterns, engine and tiny HF models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the HTML report test looks at the page in headless Chromium and its pictures are laid out by Graphviz's dot
# (Debian's packages); without them, those tests skip (and the report uses its own layout)
if ! { command -v chromium && command -v dot; } >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium graphviz; } >/dev/null 2>&1 \
    || echo "chromium or graphviz could not be installed: the screenshot and layout tests will skip" >&2
fi
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
