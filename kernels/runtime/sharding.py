"""How a fused op shards under DTensor (`torch.distributed.tensor`, tensor parallelism), declared through
torch's sharding-rule registration for custom ops (`register_sharding`), so DTensor neither falls back to
replication nor runs a kernel on a shard it cannot compute exactly.

Three forms, declared by the families whose shards compute their part exactly:
- `Rows`: every row (all dims but the last) computed on its own (RMSNorm, softmax, MoE routing);
- `BatchAndHeads`: every (batch, head) computed on its own (attention);
- `Intermediate`: an MLP's weights split along its intermediate dim, column- then row-wise (MoE experts).
An op without a rule (gated delta) raises on DTensors, and the engine keeps the original code there
(`fuser.engine.rewriter`: a near miss naming the op)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Rows:
    """The arguments (positions) that are row tensors of one shape, sharded alike along any dim but the last;
    the outputs that sum over rows (a weight's gradient) are then partial sums. Other tensors are replicated."""
    args: tuple[int, ...]
    summed: tuple[int, ...] = ()
    summed_when: int | None = None


@dataclass(frozen=True)
class BatchAndHeads:
    """Tensors [B, H, ...] computed per (batch, head), sharded alike along B or H, as are the outputs. A
    `broadcast` argument (a mask, its tile classes) is sharded with them where it has that dim whole (else
    replicated), and the `follows` outputs are placed like `broadcast[0]`, the `replicated` ones replicated. A dim
    is sharded only where every sharded size divides by the mesh's size (a query head h reads KV head
    h // (Hq // Hkv): shards keep that only then); nothing where an argument of `unsharded_with` is given (a
    dropout p > 0: each shard would draw the same random stream; sinks: one per head, not [B, H, ...]). The
    `summed` outputs, the gradient of `broadcast[0]` in its shape, are sharded like it where it has the dim whole
    and partial sums where it broadcasts (each shard sums its part); replicated where the argument `summed_when`
    is False (they are empty then). `broadcast` arguments of fewer dims align to the right, as torch broadcasts."""
    args: tuple[int, ...]
    broadcast: tuple[int, ...]
    follows: tuple[int, ...]
    unsharded_with: tuple[int, ...]
    replicated: tuple[int, ...] = ()
    summed: tuple[int, ...] = ()
    summed_when: int | None = None


@dataclass(frozen=True)
class Intermediate:
    """Megatron's split of an MLP (tensor parallelism's column- then row-wise weights): `args` (position, dim)
    sharded along the intermediate dim, which the op sums over in its last product, so each shard computes a
    partial sum of the `summed` outputs; `outputs` (position, dim) are sharded along it, the rest replicated.
    A `packed` argument (position, the argument whose None says so, or None: always) or output holds two such dims
    stacked along its dim ([gate; up]): a shard holds a slice of each, `_StridedShard(dim, split_factor=2)` (how
    transformers' own plan shards `gate_up_proj`; a plain `Shard` of it would give one rank the gate, the other
    the up rows, and stays replicated). Nothing is sharded where an argument of `unsharded_with` is given (a
    down bias: every shard would add it)."""
    args: tuple[tuple[int, int], ...]
    outputs: tuple[tuple[int, int], ...]
    summed: tuple[int, ...]
    packed_args: tuple[tuple[int, int | None], ...] = ()
    packed_outputs: tuple[int, ...] = ()
    unsharded_with: tuple[int, ...] = ()


def register(op: torch._ops.OpOverload, rule: Rows | BatchAndHeads | Intermediate) -> None:
    """Register `op`'s sharding on one mesh dim (DTensor expands it to the whole mesh)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor.experimental import register_sharding

    outputs = len(op._schema.returns)

    def placements(args: tuple, sharded: Callable[[int, Any], Any], out: Callable[[int], Any]) -> tuple[list, list]:
        ins = [sharded(i, a) if isinstance(a, DTensorSpec) else None for i, a in enumerate(args)]
        return [out(i) for i in range(outputs)], ins

    def rows(*args):
        def strategy(shard, summed):
            return placements(args, lambda i, a: shard if i in rule.args else Replicate(),
                              lambda i: summed if i in rule.summed else shard)
        return [strategy(Replicate(), Replicate())] + [strategy(Shard(d), Partial())
                                                       for d in range(args[rule.args[0]].ndim - 1)]

    def batch_and_heads(*args):
        replicated = placements(args, lambda i, a: Replicate(), lambda i: Replicate())
        if any(args[i] is not None and (not isinstance(args[i], (int, float)) or args[i] > 0)
               for i in rule.unsharded_with):
            return [replicated]
        strategies = [replicated]
        size = args[rule.args[0]].mesh.size()
        rank = args[rule.args[0]].ndim
        for d in (0, 1):
            if any(args[i].shape[d] % size for i in rule.args):
                continue

            def own_dim(a, d=d):
                """Shard(the broadcast tensor's dim aligned with d) where it has that dim whole, else None."""
                mine = d - (rank - a.ndim)
                return Shard(mine) if mine >= 0 and a.shape[mine] > 1 else None

            broadcast = args[rule.broadcast[0]]
            own = own_dim(broadcast) if broadcast is not None else None
            given = broadcast is not None and (rule.summed_when is None or bool(args[rule.summed_when]))
            summed = (own or Partial()) if given else Replicate()  # in the broadcast tensor's shape
            whole = Shard(d) if own else Replicate()  # [B, H, ...] outputs

            def sharded(i, a, d=d):
                if i in rule.args:
                    return Shard(d)
                return (own_dim(a) if i in rule.broadcast else None) or Replicate()

            def out(i, d=d, whole=whole, summed=summed):
                if i in rule.follows:
                    return whole
                if i in rule.summed:
                    return summed
                return Replicate() if i in rule.replicated else Shard(d)
            strategies.append(placements(args, sharded, out))
        return strategies

    def intermediate(*args):
        from torch.distributed.tensor.placement_types import _StridedShard  # private; in torch 2.5 to 2.13 at least

        replicated = placements(args, lambda i, a: Replicate(), lambda i: Replicate())
        if any(args[i] is not None for i in rule.unsharded_with):
            return [replicated]
        arg_dims, out_dims, packed = dict(rule.args), dict(rule.outputs), dict(rule.packed_args)

        def split(dim, pair):
            return _StridedShard(dim, split_factor=2) if pair else Shard(dim)

        def argument(i, a):
            if i not in arg_dims:
                return Replicate()
            return split(arg_dims[i], i in packed and (packed[i] is None or args[packed[i]] is None))

        def output(i):
            if i in rule.summed:
                return Partial()
            return split(out_dims[i], i in rule.packed_outputs) if i in out_dims else Replicate()
        return [replicated, placements(args, argument, output)]

    forms = {Rows: rows, BatchAndHeads: batch_and_heads, Intermediate: intermediate}
    register_sharding(op)(forms[type(rule)])


def halves(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of `t` along `dim` as views ([gate; up] -> gate, up). A DTensor packed along `dim` (an
    `Intermediate` output) is split on each rank, each half of its shard then a plain `Shard`: no gather (a split
    gathers it; torch 2.11's unflatten of a `_StridedShard` computes a wrong shape, and its redistribution of one on
    a 1-D mesh raises)."""
    if not _packed(t):
        return t.unflatten(dim, (2, -1)).unbind(dim)
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in t.placements]
    shape = (*t.shape[:dim], t.shape[dim] // 2, *t.shape[dim + 1:])
    return tuple(DTensor.from_local(half, t.device_mesh, placements, run_check=False, shape=shape,
                                    stride=torch.empty(shape, device="meta").stride())
                 for half in t.to_local().unflatten(dim, (2, -1)).unbind(dim))


def _packed(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard
    return isinstance(t, DTensor) and any(isinstance(p, _StridedShard) for p in t.placements)
