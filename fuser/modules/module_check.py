"""The check of a whole rewritten forward (`fuser.modules.module_rewriting`) against its original graph in float64.

On the recorded arguments (outputs) and on random ones of the same shapes and scale (outputs and, when
the module trains or its parameters require grad, the gradients of its floating arguments and
parameters), by the numerics contract (`fuser.numerics.contract.judge`, the original's own precision as
its floor). An argument whose gradient the fused ops get wrong (an attention mask, which the fused op
takes as a constant) is named: the rewritten graph may run only where it needs no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from fuser.modules.module_graphs import Call, is_attribute_read, module_attribute
from fuser.numerics.contract import Run, gradient_problems, judge
from fuser.numerics.float64 import leaf64, random_like, run_nodes


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
        return sorted({n.args[1] for n in self.graph.nodes if is_attribute_read(n)})

    def __call__(self, leaves: list, parameters: dict[str, torch.Tensor], float64: bool) -> tuple:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        inputs: dict[fx.Node, Any] = dict(zip(placeholders, [self.module, *leaves]))
        inputs.update({n: parameters[n.args[1]] for n in self.graph.nodes if is_attribute_read(n)})
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
