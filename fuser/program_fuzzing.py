"""Program fuzzing: hypothesis writes whole programs (a mask built some way, attention around it), each
is compiled with backend "fuser" and compared with its eager run: the proof that a recognizer only
rewrites what it can prove equal.

The grammar covers what masks are built from (`arange` with keyword or positional starts, steps and
offsets, ones / zeros / full / eye, triu / tril, comparisons, & | ^ ~, where, padding tables, views,
expand, broadcasting, cache offsets, sliding windows), edits after they are built (setitem,
masked_fill_, fill_diagonal_, index_put_, &=, triu_, writes through views, writes after the mask is
read) and the attention around them (scale spellings, casts, softmax dims, masks added, filled,
selected, or given to SDPA). A program passes when the compiled run has NaN and ±inf where the eager
float32 run has them and its other values are within the float32 tolerance of the float64 run (or
twice the eager float32 run's own error, where precision alone moves the original).

Programs are cheap (tiny shapes, codegen "eager"; on a CPU without TRITON_INTERPRET the fused op runs
its reference, which is what proves the recognizer sound), about 3 a second on one core.
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import assume, strategies as st

from fuser.fuzzing import FuzzResult, _hunt, log
from fuser.numerics.contract import numerics_error, tolerance

FILLS = ('float("-inf")', "torch.finfo(s.dtype).min", "-1e9", "-1e4", "-5.0")
SOFTMAXES = ("torch.softmax({x}, -1)", "({x}).softmax(dim=-1)",
             "F.softmax({x}, dim=-1, dtype=torch.float32).to(q.dtype)", "torch.softmax(({x}).float(), -1).type_as(q)",
             "torch.softmax({x}, dim=3)", "torch.softmax({x}, -2)")
SCORES = ("q @ k.transpose(-2, -1) * 0.35", "torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])",
          "(q * 0.35) @ k.mT", "q @ k.transpose(2, 3) * q.shape[-1] ** -0.5",
          'torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.35')


@dataclass(frozen=True)
class Program:
    """A program's source (`def program(q, k, v, pad)`), its sizes and the seed of its inputs."""
    source: str
    batch: int
    heads: int
    kv_heads: int
    lq: int
    lk: int
    dim: int
    dynamic: bool
    seed: int

    def __repr__(self) -> str:
        return (f"Program(B={self.batch}, H={self.heads}, H_kv={self.kv_heads}, Lq={self.lq}, Lk={self.lk}, "
                f"D={self.dim}, dynamic={self.dynamic}, seed={self.seed}):\n{self.source}")

    def function(self):
        namespace = {"torch": torch, "F": F, "math": math}
        exec(compile(self.source, "<fuzzed program>", "exec"), namespace)
        return namespace["program"]

    def inputs(self, lq: int | None = None, lk: int | None = None) -> tuple[torch.Tensor, ...]:
        lq, lk = lq or self.lq, lk or self.lk
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.batch, self.heads, lq, self.dim, generator=g)
        k, v = (torch.randn(self.batch, self.kv_heads, lk, self.dim, generator=g) for _ in range(2))
        return q, k, v, torch.rand(self.batch, lk, generator=g) < 0.75


@dataclass
class ProgramFuzzResult(FuzzResult):
    """`FuzzResult` of programs: every failure (when fuzzing on past the first), what each program became."""
    failures: list[str] = field(default_factory=list)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return self.examples

    def __str__(self) -> str:
        rate = self.examples / self.seconds if self.seconds else 0.0
        text = (f"fuzz programs: {'ok' if self.ok else 'FAILED'} after {self.examples} program(s), seed {self.seed}, "
                f"{self.seconds:.0f} s ({rate:.2f} programs/s)")
        text += "".join(f"\n  {n:6d}  {outcome}" for outcome, n in self.outcomes.most_common())
        return text + "".join(f"\n{failure}" for failure in self.failures)


# ---------------------------------------------------------------------------------------------
# The grammar: each strategy gives (code, rank) of a tensor that broadcasts to [B, H, Lq, Lk]
# ---------------------------------------------------------------------------------------------

small = st.integers(-3, 6)


@st.composite
def positions(draw, axis: str, rank: int) -> tuple[str, int]:
    """Positions of the queries (a column) or the keys (a row)."""
    n = "Lq" if axis == "q" else "Lk"
    c = draw(small)
    vector = draw(st.sampled_from([
        f"torch.arange({n})", f"torch.arange(end={n})", f"torch.arange({c}, {n} + {c})",
        f"torch.arange(start={c}, end={n} + {c})", f"torch.arange({c}, {n} + {c}, 1)", f"torch.arange({n}) + {c}",
        f"torch.arange(0, 2 * {n}, 2)", f"torch.arange({n}, dtype=torch.int32)", f"torch.arange({n}).flip(0)",
        f"torch.arange({n}, dtype=torch.float32)", f"(torch.arange({n}) * 1 - 0)"]
        + (["torch.arange(P, P + Lq)", "torch.arange(start=P, end=Lk)", "torch.arange(Lq) + P"]
           if axis == "q" else [])))
    if axis == "q":
        places = ["{v}[:, None]", "{v}.unsqueeze(-1)", "{v}.view(-1, 1)", "{v}.reshape(Lq, 1)"]
        places += ["{v}[None, None, :, None]"] if rank == 4 else []
    else:
        places = ["{v}[None, :]", "{v}.unsqueeze(0)", "{v}", "{v}.view(1, -1)"]
        places += ["{v}[None, None, None, :]"] if rank == 4 else []
    place = draw(st.sampled_from(places))
    return "(" + place.format(v=f"({vector})") + ")", 4 if "None, None" in place else 2


@st.composite
def relation(draw, rank: int) -> tuple[str, int]:
    (i, ri), (j, rj) = draw(positions("q", rank)), draw(positions("k", rank))
    c, w = draw(small), draw(st.integers(1, 6))
    form = draw(st.sampled_from([
        "{j} <= {i}", "{i} >= {j}", "{j} < {i} + 1", "({i} - {j}) >= 0", "torch.le({j}, {i})", "{j}.le({i})",
        "{i} > {j}", "{j} > {i} - {w}", "({i} - {j}) < {w}", "({i} - {j}).abs() < {w}", "{i} == {j}", "{i} != {j}",
        "({j} >= {c}) | ({j} <= {i})", "{j} <= {i} + {c}"]))
    return form.format(i=i, j=j, c=c, w=w), max(ri, rj)


@st.composite
def square(draw) -> tuple[str, int]:
    """An [Lq, Lk] boolean built whole: a factory, perhaps a triangle of it."""
    d = draw(small)
    base = draw(st.sampled_from(["torch.ones(Lq, Lk, dtype=torch.bool)", "torch.zeros(Lq, Lk, dtype=torch.bool)",
                                 "torch.full((Lq, Lk), True)", "torch.eye(Lq, Lk, dtype=torch.bool)",
                                 "torch.ones(Lq, Lk).bool()"]))
    shape = draw(st.sampled_from(["{x}", "torch.triu({x}, {d})", "torch.tril({x}, diagonal={d})", "{x}.tril({d})",
                                  "({x}).triu(diagonal={d})", "torch.tril({x})"]))
    return shape.format(x=base, d=d), 2


PADDING = ("pad[:, None, None, :]", "pad[torch.arange(B)[:, None, None, None], torch.arange(Lk)[None, None, None, :]]",
           "pad.view(B, 1, 1, Lk)", "pad[:, None, None, :].expand(B, H, Lq, Lk)")


def booleans(rank: int = 4, depth: int = 2) -> st.SearchStrategy[tuple[str, int]]:
    """Boolean masks of at most `rank` dims."""
    leaves = [relation(rank), square()] + ([st.sampled_from(PADDING).map(lambda p: (p, 4))] if rank == 4 else [])
    if depth == 0:
        return st.one_of(leaves)
    inner = booleans(rank, depth - 1)

    @st.composite
    def combined(draw) -> tuple[str, int]:
        (a, ra), (b, rb), (c, rc) = draw(inner), draw(inner), draw(inner)
        form = draw(st.sampled_from(["({a}) & ({b})", "({a}) | ({b})", "~({a})", "torch.logical_and({a}, {b})",
                                     "torch.logical_or({a}, {b})", "({a}).logical_not()", "torch.where({a}, {b}, {c})",
                                     "({a}) ^ ({b})", "({a}).contiguous()", "({a}).clone()", "({a}).to(torch.bool)"]
                                    + (["({a})[None]", "({a})[None, None]", "({a}).unsqueeze(0)"] if ra == 2 else [])
                                    + (["({a}).expand(B, H, Lq, Lk)"] if rank == 4 else [])))
        used = [r for name, r in (("{a}", ra), ("{b}", rb), ("{c}", rc)) if name in form]
        grown = 1 if "[None]" in form or "unsqueeze" in form else 2 if "None, None" in form else 0
        return form.format(a=a, b=b, c=c), 4 if "expand" in form else min(4, max(used) + grown)

    return st.one_of(*leaves, combined())


@st.composite
def edits(draw, name: str, rank: int, value: str) -> list[str]:
    """In-place writes into `name` (a fresh tensor of `rank` dims), `value` a Python literal to write."""
    r, c = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    forms = [f"{name}[..., :{c}] = {value}", f"{name}[..., {r}:, :{c}] = {value}", f"{name}[..., -{c + 1}:] = {value}",
             f"{name}[..., :, {c} % Lk] = {value}", f"{name}[..., ::2, :] = {value}",
             f"{name}[..., {r} % Lq, :] = {value}",
             f"{name}.view(-1)[{c} % Lk] = {value}", f"{name}[..., 0, :].fill_({value})",
             f"{name}.transpose(-1, -2)[..., 0, :] = {value}", f"{name}.tril_({c - 2})", f"{name}.triu_({c - 2})",
             f"{name}.masked_fill_(torch.eye(Lq, Lk, dtype=torch.bool), {value})"]
    if value in ("True", "False"):
        other, _ = draw(booleans(rank, depth=0))
        forms += [f"{name} &= {other}", f"{name} |= {other}", f"{name}.logical_not_()",
                  f"{name}.copy_(({other}).expand_as({name}))"]
    else:
        forms += [f"{name} += torch.where({draw(booleans(rank, depth=0))[0]}, 0.0, -1e9)"]
    if rank == 2:
        forms += [f"{name}.fill_diagonal_({value})",
                  f"{name}.index_put_((torch.tensor([{r} % Lq]), torch.tensor([{c} % Lk])), torch.tensor({value}))"]
    return draw(st.lists(st.sampled_from(forms), max_size=3))


@st.composite
def additive(draw) -> tuple[str, int]:
    """A float mask to add to the scores."""
    keep, rank = draw(booleans())
    d = draw(small)
    return draw(st.sampled_from([
        (f'torch.where({keep}, 0.0, float("-inf"))', rank),
        (f"torch.where({keep}, 0.0, torch.finfo(torch.float32).min)", rank),
        (f'torch.zeros(B, H, Lq, Lk).masked_fill(~({keep}), float("-inf"))', 4),
        (f"(1.0 - ({keep}).float()) * -1e9", rank), (f"({keep}).float().log()", rank), (f"({keep}).float()", rank),
        (f"torch.where({keep}, torch.zeros(()), -1e4)", rank),
        (f'torch.triu(torch.full((Lq, Lk), float("-inf")), {d})', 2),
        (f'torch.full((Lq, Lk), float("-inf")).tril({d})', 2),
        (f'torch.where({keep}, 0.0, float("-inf")).to(torch.bfloat16)', rank),
        (f'torch.where({keep}, 0.0, -1e9) + torch.triu(torch.full((Lq, Lk), -1e9), {d})', 4 if rank == 4 else 2)]))


@st.composite
def mask_statements(draw, kind: str) -> tuple[list[str], str]:
    """Statements that build `mask` ("bool" or "float"), and where a late edit (after it is read) goes."""
    expression, rank = draw(booleans() if kind == "bool" else additive())
    lines = [f"mask = {expression}"]
    if draw(st.booleans()):  # materialize it, then edit it
        shape = "B, H, Lq, Lk" if rank == 4 or draw(st.booleans()) else "Lq, Lk"
        rank = 4 if shape.startswith("B") else 2
        lines.append(f"mask = mask.expand({shape}).clone()")
        alias = draw(st.booleans())
        if alias:
            lines.append("early_view = mask.unsqueeze(0)[0]")
        values = ["True", "False"] if kind == "bool" else ['float("-inf")', "0.0", "-1e9"]
        lines += draw(edits("mask", rank, draw(st.sampled_from(values))))
        if alias:
            lines.append("mask = early_view")
    late = ["mask[..., :1] = " + ("False" if kind == "bool" else "0.0")] if draw(st.integers(0, 5)) == 5 else []
    return lines, "\n".join(late)


@st.composite
def programs(draw) -> Program:
    """A whole program: sizes, a mask, and attention that uses it."""
    batch, lq, lk = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 9))
    dim = draw(st.sampled_from([4, 8]))
    gqa = draw(st.integers(0, 3)) == 0
    heads, kv_heads = (2, 1) if gqa else (draw(st.integers(1, 2)),) * 2
    use = draw(st.sampled_from(["keep", "drop", "drop_inverted", "add", "sdpa_bool", "sdpa_float", "sdpa_causal",
                                "none"]))
    lines = ["B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]", "P = Lk - Lq"]
    if gqa:
        lines.append(draw(st.sampled_from(["k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)",
                                           "k, v = (x[:, :, None].expand(B, 1, 2, Lk, x.shape[-1]).reshape(B, 2, Lk, "
                                           "x.shape[-1]) for x in (k, v))"])))
    late = ""
    if use not in ("sdpa_causal", "none"):
        statements, late = draw(mask_statements("float" if use in ("add", "sdpa_float") else "bool"))
        lines += statements
    if use.startswith("sdpa"):
        argument = {"sdpa_bool": "attn_mask=mask", "sdpa_float": "attn_mask=mask.to(q.dtype)",
                    "sdpa_causal": "is_causal=True"}[use]
        lines.append(f"return F.scaled_dot_product_attention(q, k, v, {argument})")
    else:
        lines.append(f"s = {draw(st.sampled_from(SCORES))}")
        fill = draw(st.sampled_from(FILLS))
        lines.append({"keep": f"s = torch.where(mask, s, {fill})", "drop": f"s = s.masked_fill(mask, {fill})",
                      "drop_inverted": f"s = s.masked_fill(~mask, {fill})", "add": "s = s + mask", "none": ""}[use])
        lines += [late, f"return {draw(st.sampled_from(SOFTMAXES)).format(x='s')} @ v"]
    body = "".join(f"    {line}\n" for line in "\n".join(lines).split("\n") if line.strip())
    return Program(f"def program(q, k, v, pad):\n{body}", batch, heads, kv_heads, lq, lk, dim,
                   dynamic=draw(st.integers(0, 9)) == 0, seed=draw(st.integers(0, 2**31 - 1)))


# ---------------------------------------------------------------------------------------------
# Running programs
# ---------------------------------------------------------------------------------------------

class InvalidProgram(Exception):
    """The program fails in eager mode (an edit outside a tensor, a write into an expanded view)."""


def _eager(fn, inputs: tuple, float64: bool) -> torch.Tensor:
    if float64:
        inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    try:
        return fn(*inputs)
    except Exception as error:
        raise InvalidProgram(f"{type(error).__name__}: {error}") from error


def contract_problem(out: torch.Tensor, eager32: torch.Tensor, eager64: torch.Tensor) -> str | None:
    """NaN and ±inf where the eager float32 run has them; other values within the float32 tolerance
    of the float64 run, or twice the float32 run's own error there."""
    if out.shape != eager32.shape or out.dtype != eager32.dtype:
        return f"shape {tuple(out.shape)} {out.dtype} where the original gives {tuple(eager32.shape)} {eager32.dtype}"
    if not torch.equal(out.isnan(), eager32.isnan()):
        return f"NaN at {int((out.isnan() != eager32.isnan()).sum())} position(s) where the original differs"
    if not torch.equal(out.isinf(), eager32.isinf()) or not torch.equal(out[out.isinf()], eager32[eager32.isinf()]):
        return "±inf where the original differs"
    error, own = numerics_error(out, eager64), numerics_error(eager32, eager64)
    allowed = max(tolerance(torch.float32), 2 * own)
    return None if error <= allowed else (f"relative L2 error {error:.2e} above the bound {allowed:.1e} (float32's "
                                          f"tolerance, or twice the original's own error {own:.1e})")


def run_program(program: Program) -> str:
    """Compile `program` with backend "fuser" (codegen eager, strict) and compare it with eager; returns
    what the fuser made of it, raises AssertionError where the contract fails, InvalidProgram where
    the program itself fails."""
    import fuser

    fn = program.function()
    runs = [(program.lq, program.lk)] + ([(program.lq + 2, program.lk + 3)] if program.dynamic else [])
    expected = [(_eager(fn, program.inputs(*n), False), _eager(fn, program.inputs(*n), True)) for n in runs]
    torch._dynamo.reset()  # a new function each time: nothing to reuse, and no cache to grow
    fuser.reset_reports()
    compiled = torch.compile(fn, backend="fuser", options={"codegen": "eager", "strict": True}, dynamic=program.dynamic)
    for (lq, lk), (eager32, eager64) in zip(runs, expected):
        problem = contract_problem(compiled(*program.inputs(lq, lk)), eager32, eager64)
        report = fuser.last_report()
        assert problem is None, f"Lq={lq}, Lk={lk}: {problem}\n{report}"
    modes = [m.mode.split(", head dim")[0] for m in report.matches if m.pattern == "attention"]
    return "; ".join(modes) if modes else "not rewritten"


def fuzz_programs(max_examples: int = 100, seed: int | None = None, keep_going: bool = False) -> ProgramFuzzResult:
    """Fuzz `max_examples` programs. The first failure stops the run and is shrunk by hypothesis, unless
    `keep_going`: then every failure is kept as it was drawn, and the run goes on."""
    seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    result = ProgramFuzzResult("programs", ok=True, seed=seed, ran="the fused ops as they run here")
    start = time.perf_counter()

    def check_one(program: Program) -> None:
        try:
            result.outcomes[run_program(program)] += 1
        except InvalidProgram:
            assume(False)
        except Exception as error:
            if not keep_going:
                raise
            result.ok = False
            result.failures.append(f"{type(error).__name__}: {error}\n{program!r}")
            log.warning("fuzz programs: failure %d: %s", len(result.failures), result.failures[-1])

    _hunt(result, programs(), check_one, max_examples)
    if result.failure:
        result.failures.append(result.failure)
    result.seconds = time.perf_counter() - start
    return result
