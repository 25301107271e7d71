"""A module's forward as one rewritable graph, installed as the module's fused call (`fuser.modules.swap`).

- `record_calls`: the arguments each module receives in one calibration run of the model;
- `export_forward` and `program_of`: Dynamo's whole graph of a module's forward on those arguments
  (`torch._dynamo.export`, sizes symbolic, side effects refused), as a function of (module,
  *flattened arguments) that reads the module's parameters and buffers at each call;
- `ModuleGraph`: the rewritten graph as the module runs it, only for calls like the captured one
  (argument structure and constants, dtypes, devices, Dynamo's shape guards, parameter dtypes and
  shapes, training flags, arguments whose gradient the fused ops do not give needing none); any
  other call, and any call under torch.compile, runs the module's own forward.
The pass that rewrites a model's modules with these is `fuser.modules.module_rewriting`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

PLAIN_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass(frozen=True)
class Call:
    """The arguments a module received in the calibration run, as they were then (see `_snapshot`)."""
    args: tuple
    kwargs: dict

    def fresh(self) -> tuple[tuple, dict]:
        """A copy to run with: forwards may modify their arguments (a KV cache, say)."""
        return _snapshot((self.args, self.kwargs))

    def leaves(self) -> list:
        """The arguments flattened as Dynamo's graph takes them, copied afresh."""
        return pytree.tree_leaves(self.fresh())

    def argument_names(self, forward: Callable) -> list[str]:
        """A name for each flattened argument of `forward`: `mask` (by its parameter's name), `argument 3` (past
        its named parameters), `cache[0]` (inside a tuple)."""
        positional = [p.name for p in inspect.signature(forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        def name(path: tuple) -> str:
            container, key, rest = path[0], path[1], pytree.keystr(path[2:])
            if container.idx == 1:
                return str(key.key) + rest
            return (positional[key.idx] if key.idx < len(positional) else f"argument {key.idx}") + rest
        return [name(path) for path, _ in pytree.tree_flatten_with_path((self.args, self.kwargs))[0]]

    def unsupported_argument(self) -> str | None:
        """Why a graph cannot take these arguments (it takes tensors, and other values as constants)."""
        odd = [leaf for leaf in pytree.tree_leaves((self.args, self.kwargs))
               if not isinstance(leaf, (torch.Tensor, *PLAIN_CONSTANTS))]
        return f"it takes a {type(odd[0]).__name__} argument, which a graph can only take as a constant" if odd else None


def _snapshot(tree: Any) -> Any:
    """Tensors cloned, other objects deep-copied where they can be (plain constants as they are)."""
    def copy_of(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.detach().clone()
        if isinstance(leaf, PLAIN_CONSTANTS):
            return leaf
        try:
            return copy.deepcopy(leaf)
        except Exception:  # an object that cannot be copied is passed as it is
            return leaf
    return pytree.tree_map(copy_of, tree)


def record_calls(model: nn.Module, args: tuple, kwargs: dict, modules: Iterable[nn.Module]) -> dict[nn.Module, Call]:
    """The first call of each of `modules` in one run of `model(*args, **kwargs)` without gradients."""
    calls: dict[nn.Module, Call] = {}

    def record(module: nn.Module, module_args: tuple, module_kwargs: dict) -> None:
        if module not in calls:
            calls[module] = Call(*_snapshot((module_args, module_kwargs)))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:
        raise ValueError(f"fuser.convert: the model raised {type(error).__name__} on the example inputs ({error}); "
                         "give convert a call the model accepts, as convert(model, *args, **kwargs)") from error
    finally:
        for handle in handles:
            handle.remove()
    return calls


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """Buffers as they were when the block is left: the calibration run, capturing and checking run
    forwards that may update them in place (a BatchNorm's running statistics while training)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def module_attribute(module: nn.Module, path: str) -> Any:
    """`module.<path>`: how a rewritten graph reads the module's parameters and buffers, at each call."""
    return functools.reduce(getattr, path.split("."), module)


def is_attribute_read(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is module_attribute


# ---------------------------------------------------------------------------------------------
# The installed forward
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleGraph:
    """A module's rewritten forward and the calls it was captured and checked for."""
    program: fx.GraphModule     # (module, *flattened arguments) -> flattened outputs
    in_tree: Any                # (args, kwargs) as the captured call had them, every leaf 0: their structure
    out_tree: Any               # the outputs' structure, likewise
    inputs: tuple               # per flattened argument: ("tensor", dtype, device, dim) or ("constant", value)
    shape_guard: str | None     # Dynamo's shape guards over the tensor arguments, named t0, t1, ...
    parameters: tuple           # (path, dtype, device, shape) of each parameter or buffer the graph reads
    training: tuple[bool, ...]  # of the module and each submodule, in `modules()` order
    without_gradients: tuple[int, ...]  # arguments whose gradients the graph gets wrong: they must need none

    @functools.cached_property
    def in_spec(self) -> pytree.TreeSpec:
        return pytree.tree_structure(self.in_tree)

    @functools.cached_property
    def out_spec(self) -> pytree.TreeSpec:
        return pytree.tree_structure(self.out_tree)

    @functools.cached_property
    def shape_check(self) -> Callable[..., bool]:
        """`shape_guard` compiled once, a function of the tensors t0, t1, ... (as `evaluate_guards_expression`
        names them)."""
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

        namespace = dict(SYMPY_INTERP)
        exec(f"def shape_check(*tensors):\n    L = {{f't{{i}}': t for i, t in enumerate(tensors)}}\n"
             f"    return bool({self.shape_guard or True})", namespace)
        return namespace["shape_check"]

    def __getstate__(self) -> dict:
        """Without what is derived from the fields, rebuilt on use (torch warns as it copies or unpickles tree specs)."""
        return {k: v for k, v in vars(self).items() if k not in ("in_spec", "out_spec", "shape_check")}

    def accepts(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        if torch.compiler.is_compiling():  # a compiled model traces the module's own code (backend="fuser" fuses it)
            return False
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            return False
        tensors = []
        for leaf, expected in zip(leaves, self.inputs):
            if expected[0] == "tensor":
                if not isinstance(leaf, torch.Tensor) or (leaf.dtype, leaf.device, leaf.dim()) != expected[1:]:
                    return False
                tensors.append(leaf)
            elif type(leaf) is not type(expected[1]) or leaf != expected[1]:
                return False
        if torch.is_grad_enabled() and any(leaves[i].requires_grad for i in self.without_gradients):
            return False
        for path, dtype, device, shape in self.parameters:
            tensor = module_attribute(module, path)
            if (tensor.dtype, tensor.device, tuple(tensor.shape)) != (dtype, device, shape):
                return False
        return tuple(m.training for m in module.modules()) == self.training and self.shape_check(*tensors)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        return pytree.tree_unflatten(self.program(module, *pytree.tree_leaves((args, kwargs))), self.out_spec)


# ---------------------------------------------------------------------------------------------
# Capturing a module's forward
# ---------------------------------------------------------------------------------------------

def export_forward(module: nn.Module, call: Call) -> fx.GraphModule:
    """Dynamo's whole graph of `module.forward` on the call's arguments, sizes symbolic."""
    args, kwargs = call.fresh()
    with torch._dynamo.config.patch(side_effect_replay_policy="error"), torch.no_grad():
        return torch._dynamo.export(module.forward, aten_graph=False, assume_static_by_default=False)(
            *args, **kwargs).graph_module


def _fold_static_sizes(graph: fx.Graph) -> None:
    """Size arithmetic on sizes Dynamo found static (the model width, fixed by a weight) becomes the number it is,
    as in a static capture: a scale computed from the head dim is then a literal, as patterns read scales."""
    for node in list(graph.nodes):
        number = _static_number(node.meta.get("example_value")) if node.op in ("call_function", "call_method") else None
        if number is not None:
            for user in list(node.users):
                user.replace_input_with(node, number)
            graph.erase_node(node)


def _static_number(value: Any) -> int | float | bool | None:
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    if isinstance(value, torch.SymFloat):
        return value.node.maybe_as_float()
    if isinstance(value, torch.SymBool):
        return value.node.maybe_as_bool()
    return None


def program_of(exported: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """The exported graph as a function of (module, *flattened arguments) returning its flattened outputs,
    that reads the module's parameters and buffers from the module at each call instead of holding them."""
    graph = exported.graph
    paths = {id(t): path for path, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                                          module.named_buffers(remove_duplicate=False))}
    with graph.inserting_before(next(iter(graph.nodes))):
        module_node = graph.placeholder("fuser_module")
    for node in list(graph.nodes):
        path = paths.get(id(module_attribute(exported, node.target))) if node.op == "get_attr" else None
        if path is not None:
            with graph.inserting_before(node):
                read = graph.call_function(module_attribute, (module_node, path))
            read.meta = dict(node.meta)
            node.replace_all_uses_with(read)
            graph.erase_node(node)
    graph.set_codegen(fx.graph.CodeGen())
    _fold_static_sizes(graph)
    return fx.GraphModule(exported, graph)


def module_graph(program: fx.GraphModule, exported: fx.GraphModule, module: nn.Module, call: Call,
                  without_gradients: tuple[int, ...]) -> ModuleGraph:
    """What the rewritten `program` is installed as."""
    inputs, fakes = [], []
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"][1:]
    for leaf, node in zip(call.leaves(), placeholders):
        if isinstance(leaf, torch.Tensor):
            inputs.append(("tensor", leaf.dtype, leaf.device, leaf.dim()))
            fakes.append(node.meta.get("example_value", node.meta.get("val")))
        else:
            inputs.append(("constant", leaf))
    shape_guard = None
    if fakes:
        shape_guard = fakes[0].fake_mode.shape_env.produce_guards_expression(fakes, ignore_static=False)
    for node in program.graph.nodes:  # the example values hold the capture's fake tensors and shape environment
        node.meta.pop("example_value", None)
        node.meta.pop("val", None)
    parameters = tuple((n.args[1], t.dtype, t.device, tuple(t.shape)) for n in program.graph.nodes if is_attribute_read(n)
                       for t in [module_attribute(module, n.args[1])])
    return ModuleGraph(program, _structure(exported._in_spec), _structure(exported._out_spec), tuple(inputs),
                       shape_guard, parameters, tuple(m.training for m in module.modules()), without_gradients)


def _structure(spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten([0] * spec.num_leaves, spec)


def capture_failure(error: Exception) -> str:
    """Dynamo's reason in one line, with the line of the user's code it names."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
    code = re.search(r"code: (.+)", str(error))
    return f"{reason} at `{code.group(1).strip()}`" if code else reason
