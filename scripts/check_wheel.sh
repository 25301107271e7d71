#!/usr/bin/env bash
# The package as `pip install .` gives it, not the editable install the tests use: build the wheel from
# the checkout's files (tracked and untracked, nothing git ignores), install it into a fresh virtual
# environment outside the checkout, and from a directory outside it run a smoke test and the demo.
# The dependencies (torch, triton, networkx, hypothesis; transformers for the demo) are the ones the
# running Python has: nothing is downloaded (a CUDA torch must never be fetched here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# a copy of what a clean clone of this work tree holds: a stale build/ must not fill gaps in the wheel
mkdir "$work/source"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/source"
"$PYTHON" -m pip wheel -q --no-deps -w "$work/dist" "$work/source"

"$PYTHON" -m venv --system-site-packages "$work/venv"
# where the running Python is itself a virtual environment, its packages are not the system's: list them
"$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' \
  > "$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dependencies.pth"
# --ignore-installed: an editable fuser of the running Python (scripts/setup.sh) must not count as installed
"$work/venv/bin/python" -m pip install -q --no-index --no-deps --ignore-installed "$work"/dist/fuser-*.whl

cd "$work"
"$work/venv/bin/python" - "$work/venv" <<'EOF'
"""backend="fuser" found through its entry point (fuser not imported first), one rewrite, every fuser module
imported from the wheel (an editable install of the checkout must not fill in a package the wheel lacks)."""
import sys

import torch

class Scores(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1)


x = torch.randn(2, 3, 5)
torch.testing.assert_close(torch.compile(Scores(), backend="fuser", options={"codegen": "eager"})(x), Scores()(x))

import fuser

assert fuser.last_report().counts() == {"softmax": 1}, fuser.last_report()
venv = sys.argv[1]
elsewhere = sorted(name for name, module in sys.modules.items()
                   if name.split(".")[0] == "fuser" and not (getattr(module, "__file__", None) or venv).startswith(venv))
assert not elsewhere, f"not from the wheel: {elsewhere}"
print(f"wheel smoke test: backend='fuser' from its entry point rewrote {fuser.last_report().counts()}; "
      f"{sum(name.split('.')[0] == 'fuser' for name in sys.modules)} fuser modules, all from {venv}")
EOF
"$work/venv/bin/fuser" --help > /dev/null
"$work/venv/bin/fuser" demo
echo "wheel check: built, installed outside the checkout, smoke test and demo passed in $((SECONDS - start)) s"
