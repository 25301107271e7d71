"""A clone's root on sys.path shadows packages named like its top-level folders.

`python -m fuser` or `python -m pytest` run from a clone put the clone's root first on sys.path, and there its
`kernels/` (installed as `fuser.kernels`) becomes the top-level `kernels`: Hugging Face's package of that name,
which transformers (5.2x) imports, then fails to import (`cannot import name 'CUDAProperties' from 'kernels'`).
fuser is installed (the package maps those folders under `fuser.`), so the root can leave sys.path.
"""
from __future__ import annotations

import os
import sys


def is_clone_root(path: str) -> bool:
    """Whether a sys.path entry ('' is the working directory) is a fuser clone's root."""
    root = path or os.curdir
    return os.path.isdir(os.path.join(root, "fuser")) and os.path.isfile(os.path.join(root, "kernels", "__init__.py"))


def leave_clone_root() -> None:
    """Drops clone roots from sys.path, before anything imports transformers."""
    sys.path[:] = [path for path in sys.path if not is_clone_root(path)]
