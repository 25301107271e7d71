"""CUDA graphs for a rewritten graph, `options={"cudagraphs": True}`, with either codegen.

Inductor records them itself: its `triton.cudagraphs` setting, which mode="reduce-overhead" turns on
(torch.compile takes `mode=` or `options=`, never both, so the option is how to ask with fuser options).
For codegen="eager" it is torch's own `cudagraphs` backend: AOTAutograd splits the graph into forward and
backward graphs (each fused op stays one op in them), and cudagraph trees run each one, recording a CUDA
graph after a warm-up call and replaying it from then on, parameters as static inputs. The fused ops never
sync the host, so nothing in them stops a recording.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx


def require_cuda() -> None:
    """Raise, saying what to do, where CUDA graphs cannot be recorded (no CUDA device)."""
    if not torch.cuda.is_available():
        here = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        raise ValueError(f"fuser: options={{'cudagraphs': True}} records CUDA graphs, and here is {here} "
                         f"(torch {torch.__version__}); leave the option out to compile without them")


def eager_with_cuda_graphs(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The rewritten graph run eagerly (aten ops and fused ops), its forward and backward as CUDA graphs."""
    from torch._dynamo.backends.cudagraphs import cudagraphs

    return cudagraphs(gm, example_inputs)


def inductor_config(mode: str | None, cuda_graphs: bool) -> dict[str, Any] | None:
    """Inductor's settings for torch.compile's `mode`, with CUDA graphs where the option asks for them."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(mode)) if mode else {}
    if cuda_graphs:
        patches["triton.cudagraphs"] = True
    return patches or None
