"""`fuser.fuzz(pattern_name)`: hypothesis draws inputs from a pattern's strategy, the search
function is compiled through the whole backend (Dynamo capture, canonicalization, match,
check, replace), and the rewrite must meet the numerics contract against the search
function run in float64, for values and gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import given, seed as hypothesis_seed, settings
from hypothesis.errors import HypothesisException

from fuser.backend import Options, transform
from fuser.patterns import BY_NAME
from fuser.patterns.base import Example, Pattern
from fuser.verify import numerics_problem, tolerance


@dataclass
class FuzzResult:
    target: str
    ok: bool
    examples: int = 0
    worst_error: dict[str, float] = field(default_factory=dict)  # per site: worst relative L2 error seen
    failure: str | None = None    # the shrunk failing example and what went wrong
    seed: int | None = None

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        worst = ", ".join(f"{k}: {v:.1e}" for k, v in self.worst_error.items())
        text = f"fuzz {self.target}: {status} after {self.examples} example(s); worst error {worst or '-'}"
        return text + (f"\n{self.failure}\nreproduce with seed={self.seed}" if self.failure else "")


def _to64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    return value


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    finite = out.isfinite() & ref.isfinite()
    base = ref[finite].norm()
    return ((out - ref)[finite].norm() / base).item() if base > 0 else 0.0


def _assert_contract(what: str, out: torch.Tensor, ref: torch.Tensor, original: torch.Tensor) -> None:
    """The dtype's tolerance, or twice the error of the original code in its own precision where
    the problem is so ill-conditioned that the original misses the tolerance too (a row of one
    element: the RMSNorm gradient is eps-sized and cancels in float32)."""
    tol = max(tolerance(out.dtype), 2 * _rel_error(original, ref))
    problem = numerics_problem(out, ref, tol)
    assert problem is None, f"{what}: {problem}"


def run_example(pattern: Pattern, example: Example, *, grads: bool = True) -> dict[str, float]:
    """Compile the example's search function with only `pattern` enabled and compare with float64.

    Returns the relative errors (output and each gradient); raises AssertionError with the
    reason when the site is not rewritten exactly once or the numerics contract fails."""
    tensors = {k: v for k, v in example.kwargs.items() if isinstance(v, torch.Tensor)}
    literals = {k: v for k, v in example.kwargs.items() if not isinstance(v, torch.Tensor)}
    with_grad = {k for k, v in tensors.items() if grads and v.is_floating_point()}
    reports = []

    def backend(gm, example_inputs, **_):
        reports.append(transform(gm, example_inputs, Options(patterns=(pattern.name,), strict=True)))
        return gm.forward

    def fn(**kw):
        return example.search(**kw, **literals)

    torch._dynamo.reset()  # each example specializes on its literals: start from a clean cache
    inputs = {k: v.detach().clone().requires_grad_(k in with_grad) for k, v in tensors.items()}
    out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(**inputs)
    counts = [r.counts().get(pattern.name, 0) for r in reports]
    misses = [n.reason for r in reports for n in r.near_misses]
    assert sum(counts) == 1, f"expected one {pattern.name} rewrite, got {sum(counts)}; near misses: {misses}"

    ref_inputs = {k: _to64(v).requires_grad_(k in with_grad) for k, v in tensors.items()}
    ref = example.search(**ref_inputs, **{k: _to64(v) for k, v in literals.items()})
    plain_inputs = {k: v.detach().clone().requires_grad_(k in with_grad) for k, v in tensors.items()}
    plain = example.search(**plain_inputs, **literals)
    errors = {"out": _rel_error(out, ref)}
    _assert_contract("output", out, ref, plain)
    if with_grad and out.requires_grad:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        names = sorted(with_grad)
        got = torch.autograd.grad(out, [inputs[k] for k in names], grad_out.to(out.dtype), allow_unused=True)
        want = torch.autograd.grad(ref, [ref_inputs[k] for k in names], grad_out, allow_unused=True)
        baseline = torch.autograd.grad(plain, [plain_inputs[k] for k in names], grad_out.to(plain.dtype),
                                       allow_unused=True)
        for name, g, w, b in zip(names, got, want, baseline):
            if g is None or w is None:
                assert g is None and w is None, f"gradient of {name}: one side has none"
                continue
            errors[f"d{name}"] = _rel_error(g, w)
            _assert_contract(f"gradient of {name}", g, w, b)
    return errors


def fuzz(target: str, *, max_examples: int = 100, seed: int | None = None, grads: bool = True) -> FuzzResult:
    """Fuzz one pattern of the library by name (see `fuser.patterns.BY_NAME`)."""
    if target not in BY_NAME:
        raise ValueError(f"fuser.fuzz: unknown pattern {target!r}; known patterns are {', '.join(BY_NAME)}")
    pattern = BY_NAME[target]
    seed = seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item()
    result = FuzzResult(target, ok=True, seed=seed)

    @hypothesis_seed(seed)
    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(pattern.examples())
    def check(example: Example) -> None:
        result.examples += 1
        for key, error in run_example(pattern, example, grads=grads).items():
            site = f"{target}.{key}"
            result.worst_error[site] = max(result.worst_error.get(site, 0.0), error if math.isfinite(error) else 0.0)

    try:
        check()
    except (AssertionError, HypothesisException, RuntimeError) as error:
        notes = "\n".join(getattr(error, "__notes__", []))
        result.ok, result.failure = False, f"{type(error).__name__}: {error}\n{notes}".strip()
    return result
