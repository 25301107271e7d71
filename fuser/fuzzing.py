"""`fuser.fuzz(target, ...)`: hypothesis hunts for inputs on which a rewrite breaks the numerics contract.

- A pattern name: hypothesis draws examples from the pattern's strategy, the search function
  is compiled through the whole backend (Dynamo capture, canonicalization, match, check,
  replace), and the result is compared with the search function run in float64.
- A model (any callable) with its inputs, `fuser.fuzz(model, input_ids)`: Dynamo captures the
  model once with the sizes of its tensor inputs dynamic, and the sites the backend rewrites are
  found as it finds them. Hypothesis then draws new inputs for the model (each dynamic size
  between the graph's lower bound and the example's size, new values, parameters kept), the
  captured graph runs on them, and at every site the rewrite runs on the values that reach it
  and is compared with the site's original nodes run in float64. Drawing the model's inputs,
  rather than each site's inputs on their own, keeps every site's inputs consistent with what
  the pattern read off the graph (a causal mask built from `arange` is still causal).

Both check values and gradients, and return a `FuzzResult`: `.ok`, the worst error per site
and, on failure, hypothesis' shrunk example and the seed that reproduces it.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, Phase, assume, given, seed as hypothesis_seed, settings, strategies as st
from hypothesis.errors import UnsatisfiedAssumption
from torch import fx

from fuser.logs import progress
from fuser.options import Options
from fuser.engine.capture import capture
from fuser.patterns.nodes import value
from fuser.kernels.runtime import what_runs
from fuser.engine.matcher import Match
from fuser.patterns import BY_NAME
from fuser.patterns.base import Example, Pattern
from fuser.report import Where
from fuser.report.graphs import readable_input_name
from fuser.engine.rewriter import canonical_copy, plan, rewrite
from fuser.numerics.contract import Verdict, gradient_resolution, judge, neighbour_floors, nudged
from fuser.numerics.float64 import capture_values, leaf64, random_like, run_nodes, to64

log = logging.getLogger("fuser.fuzz")

# no `explain` phase: after shrinking it reruns the failing example many times (minutes for a model)
SETTINGS = dict(deadline=None, database=None, derandomize=False, phases=[p for p in Phase if p != Phase.explain],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])


@dataclass
class FuzzResult:
    target: str
    ok: bool
    examples: int = 0
    worst_error: dict[str, float] = field(default_factory=dict)  # per site: worst relative L2 error seen
    failure: str | None = None    # the shrunk failing example and what went wrong
    seed: int | None = None
    sites: list[str] = field(default_factory=list)  # the sites fuzzed (for a model)
    ran: str = ""  # what computed the fused ops: it decides what the run proves

    bounds: dict[str, float] = field(default_factory=dict)  # per site: the bound its worst error was held to
    failed_at: int | None = None  # which drawn example first failed (before hypothesis shrank it)

    def __str__(self) -> str:
        """A summary line, then each error beside its bound, then (on failure) what broke and how to rerun it."""
        if self.ok:
            text = f"fuzz {self.target}: ok after {self.examples} example(s)"
            text += f", {len(self.sites)} site(s)" if self.sites else ""
            text += ", every error within its bound" if self.worst_error else \
                (" (nothing to fuzz: no site is rewritten)" if not self.sites else "")
        else:
            first = self.failure.splitlines()[0] if self.failure else "failed"
            text = f"fuzz {self.target}: FAILED at example {self.failed_at or self.examples}: {first}"
        width = max(map(len, self.worst_error), default=0)
        text += "".join(f"\n  {key:<{width}}  {error:.1e}  {_bound_text(error, self.bounds.get(key))}"
                        for key, error in self.worst_error.items())
        if self.failure:
            text += "".join(f"\n  {line}" for line in self.failure.splitlines()[1:])
        text += f"\n  the fused ops ran as {self.ran}" if self.ran else ""
        return text + (f"\n  reproduce with seed={self.seed}" if self.failure else "")


def _bound_text(error: float, bound: float | None) -> str:
    """The bound an error was held to, for people: `<= 1e-05`, or why there was none."""
    if bound is None:
        return ""
    if math.isinf(bound):
        return "(no bound: below what float64 resolves)"
    return f"{'<=' if error <= bound else '>'} {bound:.1e}"


@dataclass(frozen=True)
class Leaf:
    """One differentiable input, as each side sees it: the rewrite, the float64 reference, the original."""
    name: str
    ours: torch.Tensor
    ref: torch.Tensor
    plain: torch.Tensor


def _leaves(named: dict[str, torch.Tensor], grads: bool, constants: tuple[str, ...] = ()) -> list[Leaf]:
    """Fresh copies of each tensor for the three runs; floating ones not named in `constants`
    require grad when `grads`."""
    out = []
    for name, t in named.items():
        wants = grads and t.is_floating_point() and name not in constants
        out.append(Leaf(name, t.detach().clone().requires_grad_(wants), leaf64(t, wants),
                        t.detach().clone().requires_grad_(wants)))
    return out


# leaves -> (the original code's result in float64, as written), from the leaves' `ref` and `plain` tensors
Original = Callable[[list[Leaf]], tuple[torch.Tensor, torch.Tensor]]


def _neighbours(named: dict[str, torch.Tensor], grads: bool, constants: tuple[str, ...], seed: int) -> list[Leaf]:
    return _leaves(nudged(named, constants, seed), grads, constants)


def _results(out: torch.Tensor, leaves: list[Leaf], side: str, grad_out: torch.Tensor | None
             ) -> dict[str, torch.Tensor | None]:
    """`out` and, with a `grad_out`, its gradient with respect to each differentiable leaf of one side."""
    results = {"out": out}
    leaves = [leaf for leaf in leaves if getattr(leaf, side).requires_grad]
    if grad_out is not None and leaves:
        grads = torch.autograd.grad(out, [getattr(leaf, side) for leaf in leaves], grad_out.to(out.dtype),
                                    allow_unused=True)
        results.update({f"d{leaf.name}": g for leaf, g in zip(leaves, grads)})
    return results


def _contract_errors(out: torch.Tensor, leaves: list[Leaf], original: Original,
                     neighbours: Callable[[int], list[Leaf]], prefix: str = "") -> dict[str, Verdict]:
    """Verdicts (the error and its bound) on the output and each input's gradient; AssertionError where the contract
    (`fuser.numerics.contract.judge`) fails, with every floor: the original's own error, float64's
    resolution of a gradient, and the floor on inputs about an ulp away (`neighbours(seed)`)."""
    ref, plain = original(leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out.device) \
        if out.requires_grad and ref.requires_grad else None
    ours, want = _results(out, leaves, "ours", grad_out), _results(ref, leaves, "ref", grad_out)
    theirs = _results(plain, leaves, "plain", grad_out)

    def measure(seed: int) -> dict:
        near = neighbours(seed)
        near_ref, near_plain = original(near)
        exact, written = _results(near_ref, near, "ref", grad_out), _results(near_plain, near, "plain", grad_out)
        return {key: (result, written.get(key)) for key, result in exact.items()}

    floors = functools.cache(lambda: neighbour_floors(measure, want))
    wrt = {f"d{leaf.name}": leaf.ref for leaf in leaves}
    errors = {}
    for key, got in ours.items():
        what = prefix + ("output" if key == "out" else f"gradient of {key[1:]}")
        if got is None or want[key] is None:
            assert got is None and want[key] is None, f"{what}: one side has none"
            continue
        resolution = gradient_resolution([grad_out], [want["out"]], wrt[key], got.dtype) if key != "out" else 0.0
        verdict = judge(got, want[key], own=theirs[key], resolution=resolution,
                        attainable=lambda key=key: floors().get(key, 0.0))
        errors[key] = verdict
        assert verdict.problem is None, f"{what}: {verdict.problem}"
    return errors


def run_example(pattern: Pattern, example: Example, *, grads: bool = True) -> dict[str, Verdict]:
    """Compile the example's search function with only `pattern` enabled and compare with float64.

    Returns the verdicts (output and each gradient: error and bound); raises AssertionError with the
    reason when the site is not rewritten exactly once or the numerics contract fails."""
    tensors = {k: v for k, v in example.kwargs.items() if isinstance(v, torch.Tensor)}
    literals = {k: v for k, v in example.kwargs.items() if not isinstance(v, torch.Tensor)}
    leaves = _leaves(tensors, grads, example.constants)
    reports = []

    def backend(gm, example_inputs, **_):
        rewritten, report = rewrite(gm, [pattern], example_inputs, strict=True)
        reports.append(report)
        return rewritten.forward

    def fn(**kw):
        return example.search(**kw, **literals)

    torch._dynamo.reset()  # each example specializes on its literals: start from a clean cache
    out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(**{x.name: x.ours for x in leaves})
    counts = [r.counts().get(pattern.name, 0) for r in reports]
    misses = [n.reason for r in reports for n in r.near_misses]
    assert sum(counts) == 1, f"expected one {pattern.name} rewrite, got {sum(counts)}; near misses: {misses}"

    def original(leaves: list[Leaf]) -> tuple[torch.Tensor, torch.Tensor]:
        return (example.search(**{x.name: x.ref for x in leaves}, **{k: to64(v) for k, v in literals.items()}),
                example.search(**{x.name: x.plain for x in leaves}, **literals))

    return _contract_errors(out, leaves, original, functools.partial(_neighbours, tensors, grads, example.constants))


def fuzz(target: str | Callable, *args: Any, max_examples: int = 100, seed: int | None = None, grads: bool = True,
         device: str | None = None, **kwargs: Any) -> FuzzResult:
    """Fuzz a pattern of the library by name (see `fuser.patterns.BY_NAME`), or every site the
    backend rewrites in `target(*args, **kwargs)` (a model or any function of tensors).

    A pattern's examples run on `device` (default: CUDA when there is one), a model's on its own."""
    seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(target, str):
        if args or kwargs:
            raise TypeError(f"fuser.fuzz({target!r}): a pattern draws its own inputs; pass inputs only with a model")
        if target not in BY_NAME:
            raise ValueError(f"fuser.fuzz: unknown pattern {target!r}; known patterns are {', '.join(BY_NAME)}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return _fuzz_pattern(BY_NAME[target], max_examples, seed, grads, device)
    if device is not None:
        raise TypeError("fuser.fuzz: `device` is for patterns; a model's examples run where its inputs are")
    if not callable(target):
        raise TypeError(f"fuser.fuzz: the target is a pattern name or a model to call, not {type(target).__name__}")
    return _fuzz_model(target, args, kwargs, max_examples, seed, grads)


def _record(result: FuzzResult, site: str, verdicts: dict[str, Verdict]) -> None:
    """Keep each key's worst error and the bound it was held to in that example."""
    for key, verdict in verdicts.items():
        name, error = f"{site}.{key}", verdict.error if math.isfinite(verdict.error) else 0.0
        if name not in result.worst_error or error > result.worst_error[name]:
            result.worst_error[name], result.bounds[name] = error, verdict.bound


def _hunt(result: FuzzResult, strategy: st.SearchStrategy, check_one: Callable[[Any], None],
          max_examples: int) -> FuzzResult:
    """Run hypothesis over `strategy`; a failure is kept with hypothesis' shrunk example. Progress (`fuser.logs`),
    one record per example: `example 3/100` while drawing, then `shrinking` tries; each example on the "fuser.fuzz"
    logger at DEBUG."""
    @hypothesis_seed(result.seed)
    @settings(max_examples=max_examples, **SETTINGS)
    @given(strategy)
    def check(example: Any) -> None:
        nonlocal last
        last = example  # hypothesis runs the shrunk failing example last
        try:
            check_one(example)
        except UnsatisfiedAssumption:  # not an example: hypothesis draws another
            raise
        except Exception:
            count(example, failed=True)
            raise
        count(example, failed=False)

    def count(example: Any, failed: bool) -> None:
        nonlocal shrinks
        if result.failed_at is not None:
            shrinks += 1
            progress("fuzz %s: shrinking example %d: try %d", result.target, result.failed_at, shrinks)
            return
        result.examples += 1
        result.failed_at = result.examples if failed else None
        progress("fuzz %s: example %d/%d %s", result.target, result.examples, max_examples,
                 "failed; shrinking it" if failed else "ok", done=result.examples, total=max_examples)
        log.debug("fuzz %s: example %d was %r", result.target, result.examples, example)

    last, shrinks = None, 0
    try:
        check()
    except Exception as error:  # a pattern raising is as much a finding as a wrong number
        what = str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"  # the contract
        result.ok, result.failure = False, f"{what}\nshrunk example: {last!r}"
    return result


def _fuzz_pattern(pattern: Pattern, max_examples: int, seed: int, grads: bool, device: str) -> FuzzResult:
    result = FuzzResult(pattern.name, ok=True, seed=seed, ran=what_runs(device))
    return _hunt(result, pattern.examples().map(lambda example: _on(example, device)),
                 lambda example: _record(result, pattern.name, run_example(pattern, example, grads=grads)),
                 max_examples)


def _on(example: Example, device: str) -> Example:
    """The example with its tensors on `device` (strategies draw them on the CPU)."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.kwargs.items()}
    return Example(example.search, moved, example.constants)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelExample:
    """New inputs for a captured model: a size for each dynamic dim, and the seed of the values."""
    sizes: dict[str, int]
    values_seed: int
    names: dict[str, str] = field(default_factory=dict, compare=False)  # symbol -> `input_ids.size(1)`

    def __repr__(self) -> str:
        sizes = ", ".join(f"{self.names.get(k, k)}={v}" for k, v in self.sizes.items())
        return f"ModelExample(sizes: {sizes or 'none dynamic'}; values from seed {self.values_seed})"


@dataclass
class Site:
    """A rewritten site of a captured graph: a name for people and the match in the (unrewritten) graph."""
    name: str
    match: Match
    outside: list[fx.Node]  # the nodes before the match whose values its nodes read


class CapturedGraph:
    """One Dynamo graph of the model (canonicalized, not rewritten), its sites, and how to make new inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, kept: set[int], patterns: tuple[Pattern, ...]):
        gm = self.gm = canonical_copy(gm)
        self.example_inputs = example_inputs
        self.fakes = [value(n) for n in gm.graph.nodes if n.op == "placeholder"]
        self.drawn = {i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and id(x) not in kept}
        self.shape_env = next((f.fake_mode.shape_env for f in self.fakes if isinstance(f, torch._subclasses.FakeTensor)
                               and f.fake_mode.shape_env is not None), None)
        self.symbols, self.names = self._symbols()
        self.sites = self._sites(patterns)
        self.differentiable = self._differentiable()

    def _sites(self, patterns: tuple[Pattern, ...]) -> list[Site]:
        """The sites the engine's plan accepts in this graph (the graph stays as it is)."""
        sites = []
        for m in plan(self.gm, patterns).matches:
            name = f"{m.pattern.name}@{Where(*m.where()).module or '<top>'}"
            repeats = sum(s.name.split("#")[0] == name for s in sites)
            inside = set(m.nodes)
            outside = list(dict.fromkeys(a for n in m.nodes for a in n.all_input_nodes if a not in inside))
            sites.append(Site(name + (f"#{repeats}" if repeats else ""), m, outside))
        return sites

    def _differentiable(self) -> set[fx.Node]:
        """Floating values that depend on a floating input (parameters included) through floating
        values: what a gradient reaches in the model. A mask built from token ids and `arange`
        is not among them, so the rewrite need not give it a gradient."""
        found: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            meta = value(node)
            if isinstance(meta, torch.Tensor) and meta.is_floating_point() and (
                    node.op == "placeholder" or any(n in found for n in node.all_input_nodes)):
                found.add(node)
        return found

    def _symbols(self) -> tuple[dict[Any, tuple[int, int]], dict[str, str]]:
        """Each dynamic size of the graph's inputs: (lower bound, size in the example); and a name for people
        (`input_ids.size(1)`, from the first input whose size it is)."""
        found, names = {}, {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        tensors_first = sorted(zip(placeholders, self.fakes), key=lambda pair: not isinstance(pair[1], torch.Tensor))
        for node, fake in tensors_first:
            dims = fake.shape if isinstance(fake, torch.Tensor) else [fake] if isinstance(fake, torch.SymInt) else []
            for axis, dim in enumerate(dims):
                if isinstance(dim, torch.SymInt):
                    suffix = f".size({axis})" if isinstance(fake, torch.Tensor) else ""
                    names.setdefault(str(dim.node.expr), readable_input_name(str(node.target)) + suffix)
                    for symbol in dim.node.expr.free_symbols:
                        hint = int(self.shape_env.backed_var_to_val[symbol])
                        lower = self.shape_env.var_to_range[symbol].lower
                        found[symbol] = (max(2, int(lower)) if math.isfinite(lower) else 2, hint)
        return found, names

    def inputs(self, example: ModelExample) -> list | None:
        """The graph's inputs for `example` (None where its sizes break the graph's guards)."""
        generator = torch.Generator().manual_seed(example.values_seed)
        substitution = {symbol: example.sizes[str(symbol)] for symbol in self.symbols}

        def size(dim: Any) -> int:
            return int(dim.node.expr.xreplace(substitution)) if isinstance(dim, torch.SymInt) else int(dim)

        inputs = list(self.example_inputs)
        for i, fake in enumerate(self.fakes):
            if isinstance(fake, torch.SymInt):
                inputs[i] = size(fake)
            elif i in self.drawn:
                inputs[i] = random_like(self.example_inputs[i], generator, [size(d) for d in fake.shape])
        if self.shape_env is not None and not self.shape_env.evaluate_guards_for_args(self.fakes, inputs):
            return None
        return inputs


def capture_model(model: Callable, args: tuple, kwargs: dict, patterns: tuple[Pattern, ...],
                  grads: bool = False) -> list[CapturedGraph]:
    """Dynamo's graphs of `model(*args, **kwargs)` with every size of the tensor inputs dynamic where
    the model allows it (sizes the code fixes stay fixed). Parameters and buffers keep their values;
    every other tensor a graph takes (the model's inputs, activations after a graph break) is drawn."""
    def dynamic(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        x = x.detach().clone()
        for dim in range(x.dim()):
            torch._dynamo.maybe_mark_dynamic(x, dim)
        return x

    kept = {id(t) for t in (*model.parameters(), *model.buffers())} if isinstance(model, torch.nn.Module) else set()
    captured = capture(model, tuple(map(dynamic, args)), {k: dynamic(v) for k, v in kwargs.items()}, dynamic=None,
                       grad=grads)  # sites decided as compile decides them when gradients are wanted
    return [CapturedGraph(gm, inputs, kept, patterns) for gm, inputs in captured]


def check_site(site: Site, values: dict[fx.Node, Any], grads: bool,
               differentiable: set[fx.Node] = frozenset()) -> dict[str, Verdict]:
    """The rewrite of one site against its original nodes in float64, on the values that reach it;
    gradients with respect to the `differentiable` inputs when `grads`."""
    m = site.match
    bound_names = {node: name for name, node in m.inputs().items()}
    label = {node: bound_names.get(node, node.name) for node in site.outside}
    tensors = [node for node in site.outside if isinstance(values[node], torch.Tensor)]
    constants = tuple(label[node] for node in tensors if node not in differentiable)
    named = {label[n]: values[n] for n in tensors}
    leaves = _leaves(named, grads, constants)

    def inputs_for(leaves: list[Leaf], side: str) -> dict[fx.Node, Any]:
        by_name = {leaf.name: leaf for leaf in leaves}
        return {node: getattr(by_name[label[node]], side) if label[node] in by_name else values[node]
                for node in site.outside}

    def original(leaves: list[Leaf]) -> tuple[torch.Tensor, torch.Tensor]:
        return (joined(m, run_nodes(m.nodes, inputs_for(leaves, "ref"), float64=True, results=m.results)),
                joined(m, run_nodes(m.nodes, inputs_for(leaves, "plain"), results=m.results)))

    ours = inputs_for(leaves, "ours")
    m.resolve = lambda node: ours[node] if node in ours else values[node]
    try:
        out = joined(m, m.pattern.replace(m))
    finally:
        m.resolve = None
    return _contract_errors(out, leaves, original, functools.partial(_neighbours, named, grads, constants),
                            prefix=f"{site.name}: ")


def _argument_names(model: Callable) -> dict[int, str]:
    """Position -> name of the model's positional parameters (none where its signature cannot be read)."""
    try:
        function = model.forward if isinstance(model, torch.nn.Module) else model  # a module's own: its forward
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {i: p.name for i, p in enumerate(parameters) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}


def joined(m: Match, result: Any) -> torch.Tensor:
    """A site's result as one tensor: a match with several results (a chain's outputs and final state) gives them
    flattened end to end, so that one comparison and one gradient cover all."""
    return result if m.results is None else torch.cat([r.flatten() for r in result])


def _fuzz_model(model: Callable, args: tuple, kwargs: dict, max_examples: int, seed: int, grads: bool) -> FuzzResult:
    graphs = capture_model(model, args, kwargs, Options().selected_patterns(), grads)
    name = type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model")
    devices = [t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    result = FuzzResult(name, ok=True, seed=seed, sites=[s.name for g in graphs for s in g.sites],
                        ran=what_runs(devices[0] if devices else "cpu"))
    log.info("fuzz %s: %d graph(s), sites: %s", name, len(graphs), ", ".join(result.sites) or "none")
    if not result.sites:
        return result
    symbols = {str(s): bounds for g in graphs for s, bounds in g.symbols.items()}
    arguments = _argument_names(model)
    names = {name: re.sub(r"^args_(\d+)", lambda m: arguments.get(int(m[1]), m[0]), described)
             for g in reversed(graphs) for name, described in g.names.items()}  # the first graph's name wins
    strategy = st.builds(functools.partial(ModelExample, names=names),
                         st.fixed_dictionaries({s: st.integers(lo, max(lo, hint))
                                                for s, (lo, hint) in symbols.items()}),
                         st.integers(0, 2**31 - 1))

    def check_one(example: ModelExample) -> None:
        for graph in graphs:
            inputs = graph.inputs(example)
            assume(inputs is not None)
            values = capture_values(graph.gm, inputs)
            for site in graph.sites:
                _record(result, site.name, check_site(site, values, grads, graph.differentiable))

    return _hunt(result, strategy, check_one, max_examples)
