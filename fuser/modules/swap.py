"""The one fused-module swap: a module keeps its identity and runs a checked call instead of its own code.

`install(module, call)` makes the module an instance of `Fused<its class>`, a subclass of its own
class (`isinstance` stays true; parameters, buffers, hooks and the state_dict are untouched), whose
forward runs `call` for the calls it was checked for and the module's own forward for any other.
A call (the protocol below) is what a converter built and checked: one fused op (a norm), a
rewritten graph (`module_graphs.ModuleGraph`), a hand-written MoE block's plan (`moe_blocks.MoEBlock`).
Copies and pickles are of the original class, converted again when loaded; what a call keeps on the
module as a cache (attributes named `_fuser_*`) stays behind.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from fuser.report import MatchRecord


class FusedCall(Protocol):
    """What a fused module runs. `accepts` says whether a call is one the check covered (argument structure,
    dtypes, devices, shapes, the weights' dtypes, training flags...); `__call__` runs it."""

    def accepts(self, module: nn.Module, args: tuple, kwargs: dict) -> bool: ...

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any: ...


class FusedModule(nn.Module):
    """Mixed into a converted module's class: its forward runs `fuser_call` for the calls that was checked for,
    its own code for any other."""
    fuser_call: FusedCall

    def forward(self, *args, **kwargs):
        if self.fuser_call.accepts(self, args, kwargs):
            return self.fuser_call(self, args, kwargs)
        return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickle (and deepcopy) as the original class, converted again when loaded; caches stay behind."""
        return _rebuild_fused, (type(self).__mro__[2],), _state(self)


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """`Fused<cls>`: a subclass of `cls` whose forward runs its `fuser_call`."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedModule, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def _rebuild_fused(cls: type) -> nn.Module:
    module = cls.__new__(cls)
    module.__class__ = fused_class(cls)
    return module


def _state(module: nn.Module) -> dict:
    """What a copy of the module takes: not the caches a call keeps on it (`_fuser_*`: stacked expert weights)."""
    return {k: v for k, v in module.__getstate__().items() if not k.startswith("_fuser_")}


def install(module: nn.Module, call: FusedCall) -> None:
    """Make `module` run `call`: the same object (its parent, hooks and references to it keep working), its
    class now `Fused<class>`."""
    module.__class__ = fused_class(type(module))
    module.fuser_call = call


def fused_copy(module: nn.Module, call: FusedCall) -> nn.Module:
    """A new `Fused<class>` module running `call` and holding the very same parameters, submodules and attributes
    as `module` (containers copied, so that changing one module's registrations leaves the other's alone)."""
    fused = _rebuild_fused(type(module))
    fused.__setstate__({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in _state(module).items()})
    fused.fuser_call = call
    return fused


@dataclass(frozen=True)
class Swap:
    """A checked conversion of one module, installed only when `convert` is not a dry run."""
    module: nn.Module
    records: tuple[MatchRecord, ...]
    call: FusedCall

    def apply(self) -> None:
        install(self.module, self.call)
