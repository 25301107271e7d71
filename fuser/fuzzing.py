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

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, Phase, assume, given, seed as hypothesis_seed, settings, strategies as st
from torch import fx

from fuser.backend import transform
from fuser.options import Options
from fuser.engine.capture import capture
from fuser.patterns.nodes import value
from fuser.kernels.runtime import interpreting
from fuser.engine.matcher import Match, find
from fuser.patterns import BY_NAME
from fuser.patterns.base import Example, Pattern
from fuser.report import MatchRecord
from fuser.engine.rewriter import prepare, rewrite
from fuser.numerics.contract import capture_values, numerics_error, numerics_problem, run_nodes, tolerance

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

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        text = f"fuzz {self.target}: {status} after {self.examples} example(s)"
        if self.sites:
            text += f", {len(self.sites)} site(s)"
        elif self.ok and not self.worst_error:
            text += " (nothing to fuzz: no site is rewritten)"
        errors = [f"{k}: {v:.1e}" for k, v in self.worst_error.items()]
        text += "; worst error " + (", ".join(errors) if len(errors) <= 4 else "".join(f"\n  {e}" for e in errors)) \
            if errors else ""
        text += f"\n  the fused ops ran as {self.ran}" if self.ran else ""
        return text + (f"\n{self.failure}\nreproduce with seed={self.seed}" if self.failure else "")


def _what_runs(device: str) -> str:
    if device == "cuda":
        return "Triton kernels on CUDA"
    if interpreting():
        return "Triton kernels through the interpreter"
    return ("their plain-torch references (set TRITON_INTERPRET=1 before starting Python to fuzz the Triton "
            "kernels on the CPU)")


def _to64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    return value


# inputs about one ulp away from an example's, on which the original is measured again where a
# rewrite misses the tolerance (4 underestimated the original's spread: a one-element fp16 RMSNorm row
# whose dx the fp32 original gets 25% wrong there and at least 32% wrong at one of 8 neighbours)
NEIGHBOURS = 8


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
        out.append(Leaf(name, t.detach().clone().requires_grad_(wants), _to64(t).requires_grad_(wants),
                        t.detach().clone().requires_grad_(wants)))
    return out


# leaves -> (the original code's result in float64, as written), from the leaves' `ref` and `plain` tensors
Original = Callable[[list[Leaf]], tuple[torch.Tensor, torch.Tensor]]


def _nudged(named: dict[str, torch.Tensor], constants: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """The tensors, each floating one not in `constants` moved by up to about one unit in its last place."""
    generator = torch.Generator().manual_seed(seed)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        shift = (torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1) * torch.finfo(t.dtype).eps
        return (t.detach().double() * (1 + shift.to(t.device))).to(t.dtype)

    return {name: nudge(t) if t.is_floating_point() and name not in constants else t for name, t in named.items()}


def _neighbours(named: dict[str, torch.Tensor], grads: bool, constants: tuple[str, ...]) -> list[list[Leaf]]:
    return [_leaves(_nudged(named, constants, seed), grads, constants) for seed in range(NEIGHBOURS)]


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


def _attainable(original: Original, neighbours: list[list[Leaf]], want: dict, grad_out: torch.Tensor | None
                ) -> dict[str, float]:
    """Per result, the error no code in the original's precision can be held below: over inputs about an
    ulp away, the worst of twice the original's own error and of how far the exact result moves. On an
    ill-conditioned result of a few elements (a one-element dX summing cancelling terms) one error is
    one rounding's luck: the original can be exact by chance where equally good code is not."""
    floor: dict[str, float] = {}
    for leaves in neighbours:
        ref, plain = original(leaves)
        exact, written = _results(ref, leaves, "ref", grad_out), _results(plain, leaves, "plain", grad_out)
        for key, result in exact.items():
            if result is not None and written.get(key) is not None and want.get(key) is not None:
                floor[key] = max(floor.get(key, 0.0), 2 * numerics_error(written[key], result), numerics_error(result, want[key]))
    return floor


def _difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ over the positions finite in both."""
    out, ref = out.detach().double(), ref.detach().double()
    finite = out.isfinite() & ref.isfinite()
    return (out - ref)[finite].norm().item()


def _finite_norm(t: torch.Tensor) -> float:
    t = t.detach().double()
    return t[t.isfinite()].norm().item()


def _float64_resolution(key: str, leaves: list[Leaf], want: dict, grad_out: torch.Tensor | None) -> float:
    """The absolute difference below which the float64 reference cannot tell a gradient from its exact value:
    2^-50 of the gradient's natural size, ‖grad_out‖·‖out‖/‖input‖. A gradient far below that size comes
    out of cancelling terms, and float64 cancels too: a float32 softmax row [46.2, -8.8] has dx ≈ ±2.3e-24,
    and float64 evaluation of the original gives [0, -2.3e-24] (its y rounds to [1, 1.3e-24]); the
    kernel's 2.3e-24 is the exact value, the reference's 0 is not. Outputs: 0 (no floor)."""
    leaf = next((leaf for leaf in leaves if f"d{leaf.name}" == key), None)
    if leaf is None or grad_out is None or want.get("out") is None:
        return 0.0
    size = _finite_norm(leaf.ref)
    if size == 0.0:
        return 0.0
    return 2.0 ** -50 * grad_out.norm().item() * _finite_norm(want["out"]) / size


def _contract_errors(out: torch.Tensor, leaves: list[Leaf], original: Original,
                     neighbours: Callable[[], list[list[Leaf]]], prefix: str = "") -> dict[str, float]:
    """Relative errors of the output and of each input's gradient; AssertionError where the contract fails:
    above the dtype's tolerance and twice the original's own error (the floor of ill-conditioned problems:
    a one-element RMSNorm row, whose gradient is eps-sized and cancels in float32), and above what the
    original's precision attains near these inputs (`_attainable`)."""
    ref, plain = original(leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out.device) \
        if out.requires_grad and ref.requires_grad else None
    ours, want = _results(out, leaves, "ours", grad_out), _results(ref, leaves, "ref", grad_out)
    theirs = _results(plain, leaves, "plain", grad_out)
    attainable = None
    errors = {}
    for key, got in ours.items():
        what = prefix + ("output" if key == "out" else f"gradient of {key[1:]}")
        if got is None or want[key] is None:
            assert got is None and want[key] is None, f"{what}: one side has none"
            continue
        errors[key] = numerics_error(got, want[key])
        tol = max(tolerance(got.dtype), 2 * numerics_error(theirs[key], want[key]))
        if _difference(got, want[key]) <= _float64_resolution(key, leaves, want, grad_out):
            tol = math.inf  # below what the float64 reference resolves: NaN and inf placement still count
        problem = numerics_problem(got, want[key], tol)
        if problem is not None:
            attainable = attainable if attainable is not None else _attainable(original, neighbours(), want, grad_out)
            problem = numerics_problem(got, want[key], max(tol, attainable.get(key, 0.0)))
        assert problem is None, f"{what}: {problem}"
    return errors


def run_example(pattern: Pattern, example: Example, *, grads: bool = True) -> dict[str, float]:
    """Compile the example's search function with only `pattern` enabled and compare with float64.

    Returns the relative errors (output and each gradient); raises AssertionError with the
    reason when the site is not rewritten exactly once or the numerics contract fails."""
    tensors = {k: v for k, v in example.kwargs.items() if isinstance(v, torch.Tensor)}
    literals = {k: v for k, v in example.kwargs.items() if not isinstance(v, torch.Tensor)}
    leaves = _leaves(tensors, grads, example.constants)
    reports = []

    def backend(gm, example_inputs, **_):
        reports.append(transform(gm, example_inputs, Options(patterns=(pattern.name,), strict=True)))
        return gm.forward

    def fn(**kw):
        return example.search(**kw, **literals)

    torch._dynamo.reset()  # each example specializes on its literals: start from a clean cache
    out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(**{x.name: x.ours for x in leaves})
    counts = [r.counts().get(pattern.name, 0) for r in reports]
    misses = [n.reason for r in reports for n in r.near_misses]
    assert sum(counts) == 1, f"expected one {pattern.name} rewrite, got {sum(counts)}; near misses: {misses}"

    def original(leaves: list[Leaf]) -> tuple[torch.Tensor, torch.Tensor]:
        return (example.search(**{x.name: x.ref for x in leaves}, **{k: _to64(v) for k, v in literals.items()}),
                example.search(**{x.name: x.plain for x in leaves}, **literals))

    return _contract_errors(out, leaves, original, lambda: _neighbours(tensors, grads, example.constants))


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


def _record(result: FuzzResult, site: str, errors: dict[str, float]) -> None:
    for key, error in errors.items():
        name = f"{site}.{key}"
        result.worst_error[name] = max(result.worst_error.get(name, 0.0), error if math.isfinite(error) else 0.0)


def _hunt(result: FuzzResult, strategy: st.SearchStrategy, check_one: Callable[[Any], None],
          max_examples: int) -> FuzzResult:
    """Run hypothesis over `strategy`; a failure is kept with hypothesis' shrunk example."""
    @hypothesis_seed(result.seed)
    @settings(max_examples=max_examples, **SETTINGS)
    @given(strategy)
    def check(example: Any) -> None:
        nonlocal last
        last = example  # hypothesis runs the shrunk failing example last
        result.examples += 1
        log.info("fuzz %s: example %d/%d: %r", result.target, result.examples, max_examples, example)
        check_one(example)

    last = None
    try:
        check()
    except Exception as error:  # a pattern raising is as much a finding as a wrong number
        notes = "\n".join(getattr(error, "__notes__", []))
        result.ok, result.failure = False, f"{type(error).__name__}: {error}\nshrunk example: {last!r}\n{notes}".strip()
    return result


def _fuzz_pattern(pattern: Pattern, max_examples: int, seed: int, grads: bool, device: str) -> FuzzResult:
    result = FuzzResult(pattern.name, ok=True, seed=seed, ran=_what_runs(device))
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

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
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
        prepare(gm)
        self.gm = gm
        self.example_inputs = example_inputs
        self.fakes = [value(n) for n in gm.graph.nodes if n.op == "placeholder"]
        self.drawn = {i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and id(x) not in kept}
        self.shape_env = next((f.fake_mode.shape_env for f in self.fakes if isinstance(f, torch._subclasses.FakeTensor)
                               and f.fake_mode.shape_env is not None), None)
        self.symbols = self._symbols()
        self.sites = self._sites(patterns)
        self.differentiable = self._differentiable()

    def _sites(self, patterns: tuple[Pattern, ...]) -> list[Site]:
        """The sites `rewrite` rewrites (on a copy), found again in this graph."""
        report = rewrite(copy.deepcopy(self.gm), patterns)
        nodes = {n.name: n for n in self.gm.graph.nodes}
        by_pattern = {p.name: p for p in patterns}
        sites = []
        for record in report.matches:
            name = f"{record.pattern}@{record.where.module or '<top>'}"
            repeats = sum(s.name.split("#")[0] == name for s in sites)
            sites.append(self._site(record, by_pattern[record.pattern], nodes, name + (f"#{repeats}" if repeats else "")))
        return sites

    @staticmethod
    def _site(record: MatchRecord, pattern: Pattern, nodes: dict[str, fx.Node], name: str) -> Site:
        for search in pattern.searches:
            m = find(pattern, search, nodes[record.nodes[-1]])
            if m is not None and tuple(n.name for n in m.nodes) == record.nodes:
                inside = set(m.nodes)
                outside = list(dict.fromkeys(a for n in m.nodes for a in n.all_input_nodes if a not in inside))
                return Site(name, m, outside)
        raise RuntimeError(f"fuser.fuzz: the {record.pattern} match at {record.where} was not found again "
                           "in the graph (a matcher that is not deterministic?)")

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

    def _symbols(self) -> dict[Any, tuple[int, int]]:
        """Each dynamic size of the graph's inputs: (lower bound, size in the example)."""
        found = {}
        for fake in self.fakes:
            dims = fake.shape if isinstance(fake, torch.Tensor) else [fake] if isinstance(fake, torch.SymInt) else []
            for dim in dims:
                if isinstance(dim, torch.SymInt):
                    for symbol in dim.node.expr.free_symbols:
                        hint = int(self.shape_env.backed_var_to_val[symbol])
                        lower = self.shape_env.var_to_range[symbol].lower
                        found[symbol] = (max(2, int(lower)) if math.isfinite(lower) else 2, hint)
        return found

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
                inputs[i] = _random_like(self.example_inputs[i], [size(d) for d in fake.shape], generator)
        if self.shape_env is not None and not self.shape_env.evaluate_guards_for_args(self.fakes, inputs):
            return None
        return inputs


def _random_like(real: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """New values of `shape` in the range the real input has (token ids stay token ids, a mask of
    ones stays ones), at its scale for floats."""
    if real.dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if real.is_floating_point():
        scale = real.float().std().item() if real.numel() > 1 else 1.0
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        return (torch.randn(shape, generator=generator) * scale).to(real.dtype).to(real.device)
    low, high = (int(real.min()), int(real.max())) if real.numel() else (0, 1)
    return torch.randint(low, high + 1, shape, generator=generator, dtype=real.dtype).to(real.device)


def capture_model(model: Callable, args: tuple, kwargs: dict, patterns: tuple[Pattern, ...]) -> list[CapturedGraph]:
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
    captured = capture(model, tuple(map(dynamic, args)), {k: dynamic(v) for k, v in kwargs.items()}, dynamic=None)
    return [CapturedGraph(gm, inputs, kept, patterns) for gm, inputs in captured]


def check_site(site: Site, values: dict[fx.Node, Any], grads: bool,
               differentiable: set[fx.Node] = frozenset()) -> dict[str, float]:
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
        return (run_nodes(m.nodes, inputs_for(leaves, "ref"), float64=True),
                run_nodes(m.nodes, inputs_for(leaves, "plain")))

    ours = inputs_for(leaves, "ours")
    m.resolve = lambda node: ours[node] if node in ours else values[node]
    try:
        out = m.pattern.replace(m)
    finally:
        m.resolve = None
    return _contract_errors(out, leaves, original, lambda: _neighbours(named, grads, constants),
                            prefix=f"{site.name}: ")


def _fuzz_model(model: Callable, args: tuple, kwargs: dict, max_examples: int, seed: int, grads: bool) -> FuzzResult:
    graphs = capture_model(model, args, kwargs, Options().selected_patterns())
    name = type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model")
    devices = [t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    result = FuzzResult(name, ok=True, seed=seed, sites=[s.name for g in graphs for s in g.sites],
                        ran=_what_runs(devices[0] if devices else "cpu"))
    log.info("fuzz %s: %d graph(s), sites: %s", name, len(graphs), ", ".join(result.sites) or "none")
    if not result.sites:
        return result
    symbols = {str(s): bounds for g in graphs for s, bounds in g.symbols.items()}
    strategy = st.builds(ModelExample, st.fixed_dictionaries({s: st.integers(lo, max(lo, hint))
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
