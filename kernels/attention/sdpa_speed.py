"""How fast `fuser::attention` is against the backend `F.scaled_dot_product_attention` picks for the same inputs,
measured per GPU (issue 14: an SDPA call is rewritten where the kernel is faster, kept where it is not).

`SPEEDUP_OVER_SDPA[gpu name][(head dim, mask kind, training)]` is SDPA's time over the kernel's (bf16, the smaller
of two lengths; > 1: the kernel is faster), written from `benchmarks/bench_sdpa_decision.py`'s last line; the
run is in benchmarks/RESULTS.md. Mask kinds: "none", "causal" (is_causal or a mask read as causal), "padding"
(causal plus key padding, read from the mask; SDPA takes the L×L tensor). A GPU, head dim or kind without a
measurement has no entry: the pattern then rewrites only where the kernel removes work SDPA does.
"""
from __future__ import annotations

import functools

import torch

SPEEDUP_OVER_SDPA: dict[str, dict[tuple[int, str, bool], float]] = {
    # 2026-12-03, torch 2.11.0+cu130, triton 3.6.0 (RESULTS.md, "Seventh session")
    "NVIDIA H200": {(64, "none", False): 0.89, (64, "none", True): 0.64, (64, "causal", False): 0.74,
                    (128, "none", False): 0.67, (128, "none", True): 0.52, (128, "causal", False): 0.46},
}


@functools.lru_cache(maxsize=16)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def speedup_over_sdpa(device: torch.device, head_dim: int, mask_kind: str | None, training: bool
                      ) -> tuple[str, float] | None:
    """(GPU name, measured speedup) for a call on `device`, or None where nothing was measured."""
    if device.type != "cuda" or mask_kind is None:
        return None
    name = _gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    speedup = SPEEDUP_OVER_SDPA.get(name, {}).get((head_dim, mask_kind, training))
    return None if speedup is None else (name, speedup)
