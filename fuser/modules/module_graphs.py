"""Graph rewriting of whole modules, for `fuser.convert(model, *example_inputs)`.

A module that convert's module-level converters (norms, MoE blocks) and transformers' attention
interface leave alone may still compute a pattern: a hand-written attention, an RMSNorm spelled
inside a block, a softmax. Each module is tried, children before parents:
- its forward is captured whole by Dynamo (`torch._dynamo.export`) on the arguments it received in
  one calibration run of the model, sizes symbolic (so the graph serves other batches and lengths);
  side effects are refused, since a graph would drop them;
- the backend's rewriter rewrites it: the same patterns, checks, per-site verification and records;
- a module is rewritten for the sites it owns: a site belongs to the module that computes its output,
  or the nearest module above that the pass tries (modules of torch.nn itself are part of their
  caller's code); one inside a module another converter handles is that converter's. So the smallest
  module that holds a site is the one rewritten, and no site is counted twice;
- the rewritten forward is checked as a whole against the original graph in float64, on the recorded
  arguments and on random ones of the same shapes: outputs, and the gradients of floating inputs and
  of parameters when the module trains or its parameters require grad;
- it is installed as a `ModuleGraph`: the graph reads the module's parameters at each call (state_dict
  unchanged) and runs only for calls like the captured one (argument structure and constants, dtypes,
  devices, Dynamo's shape guards, parameter dtypes and shapes, training flags; arguments whose gradient
  the fused ops do not give, an attention mask say, needing none); any other call, and any call under
  torch.compile, runs the module's own forward. Attributes the forward reads (a head count) are taken
  as they were.
A module whose forward cannot be captured whole is left as it is; where a pattern shows in its
partial graphs (captured on a copy, so its side effects stay there), that is a near miss saying why.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fuser.options import Options
from fuser.engine.capture import capture
from fuser.engine.canonical import where
from fuser.report import NearMiss, Report, Where
from fuser.engine.rewriter import apply, canonical_copy, decide
from fuser.numerics.contract import Run, gradient_problems, judge
from fuser.numerics.float64 import leaf64, random_like, run_nodes

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


def _is_attribute_read(node: fx.Node) -> bool:
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

def _export(module: nn.Module, call: Call) -> fx.GraphModule:
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


def _program(exported: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
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


def _module_graph(program: fx.GraphModule, exported: fx.GraphModule, module: nn.Module, call: Call,
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
    parameters = tuple((n.args[1], t.dtype, t.device, tuple(t.shape)) for n in program.graph.nodes if _is_attribute_read(n)
                       for t in [module_attribute(module, n.args[1])])
    return ModuleGraph(program, _structure(exported._in_spec), _structure(exported._out_spec), tuple(inputs),
                       shape_guard, parameters, tuple(m.training for m in module.modules()), without_gradients)


def _structure(spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten([0] * spec.num_leaves, spec)


def _capture_failure(error: Exception) -> str:
    """Dynamo's reason in one line, with the line of the user's code it names."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
    code = re.search(r"code: (.+)", str(error))
    return f"{reason} at `{code.group(1).strip()}`" if code else reason


# ---------------------------------------------------------------------------------------------
# The check of a whole rewritten forward
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Evaluation:
    """A module's original graph evaluated from given leaves and parameter values (not the module's)."""
    graph: fx.Graph     # the original graph, its outputs gathered into its last node
    module: nn.Module

    @classmethod
    def of(cls, graph: fx.Graph, module: nn.Module) -> "_Evaluation":
        """`graph`: a copy of the original graph, which this changes."""
        (output,) = [n for n in graph.nodes if n.op == "output"]
        with graph.inserting_before(output):
            graph.call_function(tuple, (output.args[0],))
        return cls(graph, module)

    def parameter_paths(self) -> list[str]:
        return sorted({n.args[1] for n in self.graph.nodes if _is_attribute_read(n)})

    def __call__(self, leaves: list, parameters: dict[str, torch.Tensor], float64: bool) -> tuple:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        inputs: dict[fx.Node, Any] = dict(zip(placeholders, [self.module, *leaves]))
        inputs.update({n: parameters[n.args[1]] for n in self.graph.nodes if _is_attribute_read(n)})
        nodes = [n for n in self.graph.nodes if n.op not in ("placeholder", "output") and n not in inputs]
        return run_nodes(nodes, inputs, float64=float64)


def _drawn_like(leaves: list, generator: torch.Generator) -> list:
    """Random floating arguments of the recorded ones' shapes and scale (a leaf with inf or NaN, an additive
    mask say, is kept as recorded); other arguments as recorded."""
    return [random_like(leaf, generator) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
            and bool(leaf.isfinite().all()) else leaf for leaf in leaves]


def _floating(values: Iterable) -> list[tuple[int, torch.Tensor]]:
    return [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.is_floating_point()]


@dataclass(frozen=True)
class Checked:
    """The outcome of `check_module_graph`: what is wrong, or the arguments (flattened) whose gradients the
    rewritten forward gets wrong (an attention mask, which the fused op takes as a constant): it may run
    only where those need no gradient."""
    problem: str | None
    without_gradients: tuple[int, ...] = ()


def check_module_graph(module: nn.Module, original: fx.Graph, rewritten: fx.GraphModule, call: Call) -> Checked:
    """The rewritten forward against the original graph run in float64, on the recorded arguments (outputs) and
    on random ones (outputs and, when the module trains or its parameters require grad, the gradients of its
    floating arguments and parameters)."""
    evaluate = _Evaluation.of(original, module)
    parameters = {path: module_attribute(module, path) for path in evaluate.parameter_paths()}
    trained = [path for path, p in parameters.items() if p.requires_grad and p.is_floating_point()]
    generator = torch.Generator().manual_seed(0)
    recorded = call.leaves()
    checked = Checked(None)
    with torch.random.fork_rng():
        for inputs, leaves, gradients in (("the recorded arguments", recorded, False),
                                          ("random arguments", _drawn_like(recorded, generator), True)):
            check_gradients = gradients and (module.training or bool(trained))
            with torch.enable_grad() if check_gradients else torch.no_grad():
                checked = _check_on(evaluate, rewritten, leaves, call.argument_names(module.forward), parameters,
                                    trained if check_gradients else None, generator)
            if checked.problem is not None:
                return Checked(f"on {inputs}, {checked.problem}")
    return checked


def _check_on(evaluate: _Evaluation, rewritten: fx.GraphModule, leaves: list, names: list[str], parameters: dict,
              trained: list[str] | None, generator: torch.Generator) -> Checked:
    """`check_module_graph` on one set of (flattened) arguments; `trained` names the parameters whose gradients
    are checked with the arguments' (None: no gradients)."""
    def copies(float64: bool) -> list:
        def copy_of(leaf: Any) -> Any:
            if not isinstance(leaf, torch.Tensor):
                return leaf
            leaf = leaf.detach().clone()
            leaf = leaf.double() if float64 and leaf.is_floating_point() else leaf
            return leaf.requires_grad_(trained is not None and leaf.is_floating_point())
        return [copy_of(leaf) for leaf in leaves]

    own_runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        own_leaves = copies(False)
        own_runs.append((own_leaves, evaluate(own_leaves, parameters, float64=False)))
    (own_leaves, own), (_, again) = own_runs
    if any(not torch.equal(a, b) for (_, a), (_, b) in zip(_floating(own), _floating(again))):
        return Checked("its forward is random (dropout while training?), so the rewrite cannot be checked; "
                       "convert in eval mode")
    params64 = {path: leaf64(p, path in (trained or ())) if p.is_floating_point() else p
                for path, p in parameters.items()}
    fused_leaves, ref_leaves = copies(False), copies(True)
    try:
        ref = evaluate(ref_leaves, params64, float64=True)
    except Exception as error:  # an op without a float64 kernel, say
        return Checked(f"its original code does not run in float64 for the check ({type(error).__name__}: {error})")
    fused = rewritten(evaluate.module, *fused_leaves)
    problem = next((f"output {i}: {verdict.problem}" for i, out in _floating(fused)
                    for verdict in [judge(out, ref[i], own=own[i])] if verdict.problem), None)
    if problem is not None or trained is None:
        return Checked(problem)
    arguments = [i for i, leaf in enumerate(fused_leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]

    def run(outputs: Sequence, leaf_values: list, params: dict) -> Run:
        return Run(outputs, [leaf_values[i] for i in arguments] + [params[path] for path in trained])

    problems = gradient_problems([names[i] for i in arguments] + trained, run(fused, fused_leaves, parameters),
                                 run(own, own_leaves, parameters), run(ref, ref_leaves, params64), generator)
    parameter_problem = next((p for p in problems[len(arguments):] if p), None)
    if parameter_problem is not None:
        return Checked(parameter_problem)
    return Checked(None, tuple(i for i, p in zip(arguments, problems) if p))


# ---------------------------------------------------------------------------------------------
# The pass over a model's modules
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rewritten:
    """A module whose rewritten forward passed every check, ready to be installed."""
    name: str
    module: nn.Module
    graph: ModuleGraph
    report: Report      # its own matches (and near misses), with the before/after pictures of its graph


def _joined(name: str, relative: str) -> str:
    return f"{name}.{relative}" if name and relative else name or relative


class _Ownership:
    """Which module a site belongs to: walking up from the module that computes its output (the value a rewrite
    replaces), the first module the pass tries or another converter handles (modules of torch.nn itself are
    neither: their code belongs to whoever calls them)."""

    def __init__(self, candidates: set[str], handled: set[str]):
        self.candidates, self.handled = candidates, handled

    def owner(self, path: str, name: str) -> str | None:
        """Of a site at `path` in the graph of module `name`; None where another converter handles it."""
        while path != name and path not in self.candidates and path not in self.handled:
            path = path.rpartition(".")[0]
        return None if path in self.handled else path


def _own_records(report: Report, name: str, paths: dict[str, str], ownership: _Ownership) -> Report:
    """The matches and near misses of module `name`'s graph that belong to that module, placed in the model."""
    def placed(record: Any) -> Any:
        site = paths.get(record.nodes[-1], record.where.module) if record.nodes else record.where.module
        return dataclasses.replace(record, where=Where(_joined(name, site), record.where.location))

    def own(records: list) -> list:
        return [r for r in map(placed, records) if ownership.owner(r.where.module, name) == name]

    return Report(own(report.matches), own(report.near_misses), report.graphs)


def _module_paths(graph: fx.Graph, root: nn.Module) -> dict[str, str]:
    """For each node, the path in `root` of the module whose code made it. Dynamo's nn_module_stack is keyed by
    the modules' ids; its path strings name them through whatever Dynamo traced from (`L['fn'].__self__...`)."""
    names = {str(id(m)): name for name, m in root.named_modules(remove_duplicate=False)}

    def path(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack")
        return names.get(list(stack)[-1].split("@")[0], where(node)[0]) if stack else ""

    return {node.name: path(node) for node in graph.nodes}


def _rewrite(gm: fx.GraphModule, root: nn.Module, example_inputs: list,
             options: Options) -> tuple[fx.GraphModule, Report, dict[str, str]]:
    """The backend's rewrite of a canonical copy of `gm` (a graph of `root`): the rewritten copy, its report, and
    the module path of each node of the canonical graph."""
    canonical = canonical_copy(gm)
    paths = _module_paths(canonical.graph, root)  # before the rewrite erases the matched nodes
    decided = decide(canonical, options.selected_patterns(), example_inputs, verify=options.verify,
                     strict=options.strict)
    return canonical, apply(decided, strict=options.strict, pictures=True), paths


def _untraceable(name: str, module: nn.Module, call: Call, reason: str, ownership: _Ownership) -> Report:
    """Near misses for the patterns in the partial graphs of a forward that cannot be captured whole."""
    report = Report()
    try:
        args, kwargs = call.fresh()
        copied = copy.deepcopy(module)
        graphs = capture(copied, args, kwargs)
    except Exception:  # nothing more to learn about a forward Dynamo cannot even run in pieces
        return report
    for gm, example_inputs in graphs:
        _, found, paths = _rewrite(gm, copied, example_inputs, Options(verify=False))
        own = _own_records(found, name, paths, ownership)
        report.near_misses += [NearMiss(m.pattern, m.where, f"its module's forward cannot be captured as one graph "
                                        f"({reason}); left as it is", m.nodes) for m in own.matches]
        report.near_misses += own.near_misses
    return report


def _rewrite_module(name: str, module: nn.Module, call: Call, ownership: _Ownership) -> Rewritten | Report:
    """Capture, rewrite and check one module: what to install, or the report of why not (maybe empty)."""
    unsupported = call.unsupported_argument()
    if unsupported is not None:
        return _untraceable(name, module, call, unsupported, ownership)
    try:
        exported = _export(module, call)
    except Exception as error:  # Dynamo's refusals take many forms; each is a reason to leave the module alone
        return _untraceable(name, module, call, _capture_failure(error), ownership)
    program = _program(exported, module)
    rewritten, found, paths = _rewrite(program, module, [module, *call.leaves()], Options(verify=True))
    own = _own_records(found, name, paths, ownership)
    if not own.matches:
        return Report([], own.near_misses)
    checked = check_module_graph(module, program.graph, rewritten, call)
    if checked.problem is not None:
        return Report([], [NearMiss(m.pattern, m.where, f"{checked.problem}; kept the original", m.nodes)
                           for m in own.matches] + own.near_misses)
    if checked.without_gradients:
        names = call.argument_names(module.forward)
        own.notes.append(f"{name or type(module).__name__} runs its rewritten graph only where "
                         f"{', '.join(names[i] for i in checked.without_gradients)} needs no gradient "
                         "(the fused ops give none for it)")
    return Rewritten(name, module, _module_graph(rewritten, exported, module, call, checked.without_gradients), own)


def rewrite_modules(model: nn.Module, args: tuple, kwargs: dict, handled: set[nn.Module]) -> tuple[list[Rewritten], Report]:
    """Every module of `model` outside `handled` (and their submodules) whose forward holds a pattern, rewritten
    and checked on the calls of one run of `model(*args, **kwargs)`; and the report of the rest."""
    handled_names = {_joined(name, sub) for name, m in model.named_modules() if m in handled
                     for sub, _ in m.named_modules()}
    tried = {name: m for name, m in model.named_modules()
             if name not in handled_names and not type(m).__module__.startswith("torch.")}
    report, rewritten = Report(), []
    with buffers_kept(model):
        calls = record_calls(model, args, kwargs, tried.values())
        ownership = _Ownership({name for name, m in tried.items() if m in calls}, handled_names)
        for name, module in reversed(list(tried.items())):  # children first
            if module in calls:
                try:
                    outcome = _rewrite_module(name, module, calls[module], ownership)
                except Exception as error:  # a bug here must not break the user's model: the module stays as it is
                    outcome = Report(notes=[f"{name or type(module).__name__}: graph rewriting failed "
                                            f"({type(error).__name__}: {error}); left as it is"])
                if isinstance(outcome, Rewritten):
                    rewritten.append(outcome)
                    report.extend(outcome.report)
                else:
                    report.extend(outcome)
    return rewritten, report
