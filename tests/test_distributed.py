"""fuser under torch.distributed, on CPU with 2 gloo processes (and on 2 GPUs with NCCL where a machine has them):
a training step under FSDP2 (`fully_shard`: the compiled graphs see whole parameters, so every site is rewritten
as without it) and under tensor parallelism (DTensor: the fused ops shard by their own rules,
`kernels/runtime/sharding.py`), each giving the output and gradients of the model run whole, within the numerics
contract against float64."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fuser
from fuser.numerics.contract import judge

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2
# (device, backend, codegen): CPU runs the rest of the graph eagerly (Inductor's CPU compile costs CI minutes)
SETUPS = [("cpu", "gloo", "eager")] + [("cuda", "nccl", "inductor")] * (torch.cuda.device_count() >= WORLD)


class Block(nn.Module):
    """RMSNorm, then attention (4 heads; causal, with a mask the code builds) with separate q, k, v projections
    (as tensor parallelism splits them), and a residual."""

    def __init__(self, dim: int = 32, head_dim: int = 8, causal: bool = True):
        super().__init__()
        self.head_dim, self.causal = head_dim, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x):
        h = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        b, length, _ = h.shape
        q, k, v = (p(h).view(b, length, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        if self.causal:
            hidden = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(hidden, -torch.inf)
        a = torch.softmax(scores, dim=-1) @ v
        return x + self.o(a.transpose(1, 2).reshape(b, length, -1))


def _check(what: str, ours: torch.Tensor, ref64: torch.Tensor, own: torch.Tensor) -> None:
    verdict = judge(ours.detach(), ref64.detach(), own=own.detach())
    assert verdict.problem is None, f"{what}: {verdict.problem}"


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _reference(model: nn.Module, inputs: list[torch.Tensor], dtype: torch.dtype):
    """The model run whole, undistributed, in `dtype`: the outputs for each input and the gradients of the
    mean over inputs of each output's sum (what data-parallel ranks averaging their gradients compute)."""
    model = copy.deepcopy(model).to(dtype)
    outs = [model(x.to(dtype)) for x in inputs]
    (sum(o.sum() for o in outs) / len(outs)).backward()
    return outs, {name: p.grad for name, p in model.named_parameters()}


def _fsdp2(rank: int, device: str, codegen: str) -> None:
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).to(device)
    inputs = [torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(r)).to(device) for r in range(WORLD)]
    (ref64, grads64), (ref32, grads32) = (_reference(model, inputs, dtype) for dtype in (torch.float64, torch.float32))
    for block in model:
        fully_shard(block)
    fully_shard(model)
    fuser.reset_reports()
    out = torch.compile(model, backend="fuser", options={"codegen": codegen})(inputs[rank])
    out.sum().backward()  # FSDP2 averages the gradients over the ranks
    assert fuser.last_report().counts() == {"rms_norm": 2, "attention": 2}, fuser.last_report()
    _check("output", out, ref64[rank], ref32[rank])
    for name, p in model.named_parameters():
        _check(f"gradient of {name}", _whole(p.grad), grads64[name], grads32[name])


def _tensor_parallel(rank: int, device: str, codegen: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    torch.manual_seed(0)
    model = Block(causal=False).to(device)  # a mask of plain tensors would meet DTensor scores: TP cannot run that
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0)).to(device)
    (ref64,), grads64 = _reference(model, [x], torch.float64)
    (ref32,), grads32 = _reference(model, [x], torch.float32)
    heads = ColwiseParallel(use_local_output=False)  # q, k, v stay DTensors sharded by head into attention
    parallelize_module(model, init_device_mesh(device, (WORLD,)),
                       {"q": heads, "k": heads, "v": heads, "o": RowwiseParallel(input_layouts=Shard(-1))})
    fuser.reset_reports()
    out = torch.compile(model, backend="fuser", options={"codegen": codegen})(x)
    out.sum().backward()
    report = fuser.last_report()
    assert report.counts() == {"rms_norm": 1, "attention": 1} and not report.near_misses, report
    _check("output", out, ref64, ref32)
    for name, p in model.named_parameters():
        _check(f"gradient of {name}", _whole(p.grad), grads64[name], grads32[name])


def _worker(rank: int, port: int, device: str, backend: str, codegen: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        for step in (_fsdp2, _tensor_parallel):  # one pair of processes for both: starting them is most of the time
            torch._dynamo.reset()
            step(rank, device, codegen)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device, backend, codegen", SETUPS, ids=[s[0] for s in SETUPS])
def test_training_steps_under_fsdp2_and_tensor_parallelism_equal_the_model_run_whole(device, backend, codegen):
    mp.spawn(_worker, args=(_free_port(), device, backend, codegen), nprocs=WORLD)
