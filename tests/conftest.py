"""Test setup: real Triton kernels through the interpreter on CPU, hypothesis profiles.

TRITON_INTERPRET must be set before triton is imported (kernels pick interpreter or
compiler when they are decorated), so it is set here, before `fuser` is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fuser.source_tree import leave_clone_root  # noqa: E402

leave_clone_root()  # `python -m pytest` from the clone's root: its kernels/ would shadow Hugging Face's `kernels`

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
