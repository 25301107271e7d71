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
from torch.distributed.tensor import DTensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import fuser
from fuser.numerics.contract import judge

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2
# (device, backend, codegen): CPU runs the rest of the graph eagerly (Inductor's CPU compile costs CI minutes)
SETUPS = [pytest.param("cpu", "gloo", "eager", id="cpu"),
          pytest.param("cuda", "nccl", "inductor", id="cuda", marks=pytest.mark.skipif(
              torch.cuda.device_count() < WORLD or not dist.is_nccl_available(),
              reason=f"needs {WORLD} CUDA GPUs and NCCL (this machine has {torch.cuda.device_count()} GPU(s), "
                     f"NCCL {'available' if dist.is_available() and dist.is_nccl_available() else 'unavailable'})"))]


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
    """A DTensor's whole value; one packed along a dim (`_StridedShard`, on a 1-D mesh) reassembled by hand from
    the shards: torch 2.11 cannot redistribute it there."""
    from torch.distributed.tensor.placement_types import _StridedShard
    if not isinstance(t, DTensor):
        return t
    (placement,) = t.placements
    if not isinstance(placement, _StridedShard):
        return t.full_tensor()
    shards = [torch.empty_like(t.to_local()) for _ in range(WORLD)]
    dist.all_gather(shards, t.to_local().contiguous())
    pieces = [shard.chunk(placement.split_factor, placement.dim) for shard in shards]
    return torch.cat([piece[i] for i in range(placement.split_factor) for piece in pieces], placement.dim)


def _reference(model: nn.Module, inputs: list[torch.Tensor], dtype: torch.dtype):
    """The model run whole, undistributed, in `dtype`: the outputs for each input and the gradients of the
    mean over inputs of each output's sum (what data-parallel ranks averaging their gradients compute)."""
    model = copy.deepcopy(model).to(dtype)
    outs = [model(x.to(dtype) if x.is_floating_point() else x) for x in inputs]
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


class _Logits(nn.Module):
    """A transformers causal LM's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


class _LocalCalls(TorchDispatchMode):
    """The shapes of the tensors each `fuser::moe_*` op is called with on plain tensors: under DTensor, the
    local call DTensor makes on each rank's shards (DTensor-level calls are handed on to DTensor)."""

    def __init__(self):
        super().__init__()
        self.shapes: dict[str, list[list]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        name = func._schema.name
        computed = not any(isinstance(a, FakeTensor) or a.is_meta for a in args if isinstance(a, torch.Tensor))
        if name.startswith("fuser::moe_") and computed:  # not DTensor's propagation of shapes
            self.shapes.setdefault(name, []).append([tuple(a.shape) if isinstance(a, torch.Tensor) else None
                                                     for a in args])
        return func(*args, **(kwargs or {}))


def _shard_experts(name: str, module: nn.Module, mesh) -> None:
    """transformers' own tensor-parallel placements of 3-D experts ("packed_colwise" on gate_up_proj [E, 2I, H]:
    a slice of the gate rows and of the up rows on each rank; "rowwise" on down_proj [E, H, I])."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    for param, placement in (("gate_up_proj", _StridedShard(1, split_factor=2)), ("down_proj", Shard(2))):
        if param in module._parameters:
            module.register_parameter(param, nn.Parameter(distribute_tensor(module._parameters[param], mesh,
                                                                            [placement])))


def _moe_tensor_parallel(rank: int, device: str, codegen: str) -> None:
    """A tiny OLMoE through `fuser.convert` (the experts on `fuser::moe_experts`) with its experts tensor-parallel:
    tokens and routes replicated into the experts, the experts' weights sharded along the intermediate dim, the
    output a partial sum reduced after them. Not through torch.compile: transformers' experts code (grouped_mm)
    has no DTensor rule, so Dynamo cannot trace the original code under DTensor to find it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, distribute_module
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module
    from fuser.models import tiny_inputs, tiny_model
    experts, hidden, intermediate = 4, 32, 16
    model = _Logits(tiny_model("olmoe", layers=1, num_experts=experts, hidden_size=hidden,
                               intermediate_size=intermediate)).to(device)
    ids = tiny_inputs(model.model, batch=2, length=7).to(device)
    model.model.config._experts_implementation = "eager"  # the references' experts: grouped_mm has no float64
    (ref64,), grads64 = _reference(model, [ids], torch.float64)
    (ref32,), grads32 = _reference(model, [ids], torch.float32)
    assert fuser.convert(model.model, dry_run=True).counts()["moe"] == 1
    fuser.convert(model.model)
    mesh = init_device_mesh(device, (WORLD,))
    for layer in model.model.model.layers:
        block = layer.mlp.experts
        distribute_module(block, mesh, _shard_experts)
        parallelize_module(block, mesh, PrepareModuleInput(input_layouts=(Replicate(),) * 3,
                                                             desired_input_layouts=(Replicate(),) * 3,
                                                             use_local_output=False))
        parallelize_module(block, mesh, PrepareModuleOutput(output_layouts=Partial(),
                                                              desired_output_layouts=Replicate()))
    with CommDebugMode() as comms, _LocalCalls() as calls:
        out = model(ids)
        out.sum().backward()
    _check("output", out, ref64, ref32)
    for name, p in model.named_parameters():
        _check(f"gradient of {name}", _whole(p.grad), grads64[name], grads32[name])
    # the experts ran on each rank's shards: half the intermediate rows and columns, and no gather
    half = intermediate // WORLD
    (forward,), (backward,) = calls.shapes["fuser::moe_experts_forward"], calls.shapes["fuser::moe_experts_backward"]
    assert forward[3:6] == [(experts, 2 * half, hidden), None, (experts, hidden, half)], forward
    assert backward[4:7] == [(experts, 2 * half, hidden), None, (experts, hidden, half)], backward
    counts = {str(op).split(".")[-1]: n for op, n in comms.get_comm_counts().items() if n}
    assert counts == {"all_reduce": 3}, counts  # the output forward, d(x) and d(routing weights) backward
    _separate_gate_and_up(mesh, device)
    _routes_by_rows(mesh, device)


def _separate_gate_and_up(mesh, device: str) -> None:
    """`fuser::moe_experts` with gate and up [E, I, H] apart (hand-written experts stacked from nn.Linear weights
    that ColwiseParallel shards: Shard(1) each), down Shard(2): computed on the shards, the gradients of gate and
    up each rank's halves of the packed one, as the plain call."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    g = torch.Generator().manual_seed(2)
    x, gate, up, down = (torch.randn(*shape, generator=g).to(device) for shape in ((6, 8), (2, 4, 8), (2, 4, 8),
                                                                                    (2, 8, 4)))
    ids, weights = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 1]], device=device), torch.rand(6, 2,
                                                                                                        generator=g)
    leaves = [t.requires_grad_() for t in (x, gate, up, down)]
    torch.ops.fuser.moe_experts(x, ids, weights.to(device), gate, up, down).pow(2).sum().backward()
    placements = (Replicate(), Shard(1), Shard(1), Shard(2))
    sharded = [distribute_tensor(t.detach(), mesh, [p]).requires_grad_() for t, p in zip(leaves, placements)]
    routes = [distribute_tensor(t.to(device), mesh, [Replicate()]) for t in (ids, weights)]
    with _LocalCalls() as calls:
        out = torch.ops.fuser.moe_experts(sharded[0], *routes, *sharded[1:3], sharded[3])
        assert out.placements == (Partial(),)
        out.full_tensor().pow(2).sum().backward()
    assert calls.shapes["fuser::moe_experts_forward"][0][3:6] == [(2, 2, 8), (2, 2, 8), (2, 8, 2)]
    grad_placements = (Partial(), *placements[1:])  # d(x) a partial sum over the intermediate dim
    for name, ours, leaf, placement in zip(("x", "gate", "up", "down"), sharded, leaves, grad_placements):
        assert ours.grad.placements == (placement,), (name, ours.grad.placements)
        whole = ours.grad.full_tensor()  # partial sums added in another order: float32 rounding apart
        assert (whole - leaf.grad).norm() <= 1e-5 * leaf.grad.norm(), f"gradient of {name}"


def _routes_by_rows(mesh, device: str) -> None:
    """`fuser::moe_route` on DTensors: replicated router logits give replicated routes, logits sharded by token
    routes sharded alike (each shard routing its own tokens), as the plain call, gradient included."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    logits = torch.randn(14, 4, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    weights, ids = torch.ops.fuser.moe_route(logits, 2, "softmax", True, None, 1.0, torch.float32)
    weights.pow(2).sum().backward()  # renormalized: the plain sum has no gradient
    for placement in (Replicate(), Shard(0)):
        sharded = distribute_tensor(logits.detach(), mesh, [placement]).requires_grad_()
        with _LocalCalls() as calls:
            ours, our_ids = torch.ops.fuser.moe_route(sharded, 2, "softmax", True, None, 1.0, torch.float32)
            ours.pow(2).sum().backward()
        assert ours.placements == our_ids.placements == sharded.grad.placements == (placement,)
        assert [call[0] for call in calls.shapes["fuser::moe_route_forward"]] == [tuple(sharded.to_local().shape)]
        for what, got, want in (("weights", ours, weights), ("ids", our_ids, ids), ("gradient", sharded.grad,
                                                                                     logits.grad)):
            torch.testing.assert_close(got.full_tensor(), want, msg=f"routes {what} under {placement}")


def _worker(rank: int, port: int, device: str, backend: str, codegen: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        for step in (_fsdp2, _tensor_parallel, _moe_tensor_parallel):  # one pair of processes for both: starting them is most of the time
            torch._dynamo.reset()
            step(rank, device, codegen)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device, backend, codegen", SETUPS)
def test_training_steps_under_fsdp2_and_tensor_parallelism_equal_the_model_run_whole(device, backend, codegen):
    mp.spawn(_worker, args=(_free_port(), device, backend, codegen), nprocs=WORLD)
