"""Launching Triton kernels: launch sizes and the replay of recorded launches (host time per call)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import linecache
import logging
import math
import operator
import threading
from dataclasses import dataclass

import torch
import triton

from .dispatch import interpreting


def next_pow2(n: int) -> int:
    """The next power of two, 1 for n <= 1 (plain Python: triton.next_power_of_2 costs ~4 us a call on the
    host, and launch paths take several per call)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division by b > 0 (plain Python, as next_pow2); on a symbolic size, an expression of it that
    Inductor's generated code computes per call (a grid, a buffer's size)."""
    return (a + b - 1) // b


def bounded(n, low: int, high: int):
    """max(low, min(n, high)): plain Python on an int (torch.sym_max costs ~3 us a call on the host), an
    expression of a symbolic n."""
    if type(n) is int:
        return max(low, min(n, high))
    return torch.sym_max(low, torch.sym_min(n, high))


def known(n) -> int | None:
    """n as an int where it is one, or a symbolic size its ShapeEnv has fixed (a dim Dynamo made dynamic, then
    specialized: a head count matched against a weight's); None where it is symbolic (traced for Inductor under
    dynamic shapes: a decision read from its value would guard on it, so those take what is valid for every
    value)."""
    if type(n) is int:
        return n
    return n.node.maybe_as_int() if isinstance(n, torch.SymInt) else None


@dataclass(frozen=True)
class RowTiling:
    """How a row kernel covers a [rows, N] matrix: `block_m` rows × `block_n` columns at a time.

    A row longer than `block_n` is walked block by block; `block_m` > 1 gives short rows
    enough work per program.
    """
    block_m: int
    block_n: int
    num_warps: int

    @staticmethod
    def for_rows(n_rows: int | None, n_cols: int | None, max_block_n: int, min_tile: int = 2048,
                 elements_per_thread: int = 16, max_warps: int = 16, any_cols_block_n: int = 2048) -> "RowTiling":
        """A tile of about `min_tile` or more elements, `elements_per_thread` of them per thread. A size of None
        (symbolic, `known`) takes a tile valid for every value: any row count fills `min_tile`, rows of any
        length are walked in `any_cols_block_n` blocks (never held whole: `fits` is False)."""
        block_n = min(max_block_n, any_cols_block_n if n_cols is None else next_pow2(n_cols))
        block_m = max(1, min_tile // block_n)
        if n_rows is not None:
            block_m = min(next_pow2(n_rows), block_m)
        num_warps = min(max_warps, max(1, block_m * block_n // (32 * elements_per_thread)))
        return RowTiling(block_m, block_n, num_warps)

    def fits(self, n_cols) -> bool:
        """Whether a row of n_cols is held in one block (ROW_FITS); False for a symbolic length."""
        cols = known(n_cols)
        return cols is not None and cols <= self.block_n


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a [rows, N] matrix whose last dim is contiguous (a view when strides allow)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


@functools.lru_cache
def program_slots(device: torch.device) -> int:
    """How many programs a persistent kernel launches: the multiprocessor count (4 when interpreting)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Tuning kept on disk. Triton's autotuner benchmarks every candidate in each new process unless its results are
# cached (`cache_results`, Triton 3.3 on: keyed by the kernel's source, the device, the tuning key and the
# candidates); launches Inductor generates keep their tuning in Inductor's own cache.
_CACHES_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs, key, **options):
    """`triton.autotune` with its results kept on disk across processes where this Triton can keep them, and its
    benchmarking of a new key's candidates reported as progress (`fuser.progress`, drawn by fuser/logs.py)."""
    if _CACHES_RESULTS:
        options["cache_results"] = True
    tune = triton.autotune(configs=configs, key=key, **options)
    return lambda fn: _reporting(tune(fn))


_PROGRESS = logging.getLogger("fuser.progress")


def _reporting(tuner):
    """`tuner` (Triton's Autotuner) with a progress record per candidate it benchmarks: `prune_configs` gives a new
    key's candidates and `_bench` times one (both so in Triton 3.6 and 3.9), so a key found in the cache on disk
    reports nothing. The last record of a key clears its line on a terminal."""
    prune, bench = tuner.prune_configs, tuner._bench
    name = getattr(getattr(tuner, "base_fn", None), "__name__", "a kernel")
    counted = [0, 0]  # benchmarked, candidates

    def candidates(*args, **kwargs):
        kept = prune(*args, **kwargs)
        counted[:] = [0, len(kept)]
        return kept

    def timed(*args, config, **meta):
        try:
            return bench(*args, config=config, **meta)
        finally:
            counted[0] += 1
            _PROGRESS.info("fuser: tuning %s: candidate %d of %d", name, *counted,
                           extra={"progress": tuple(counted), "leave": False if counted[0] >= counted[1] else None})
    tuner.prune_configs, tuner._bench = candidates, timed
    return tuner


# Launches traced for Inductor. While a fused op's body is traced for Inductor (runtime/ops.py), each launch is
# recorded through `torch.library.wrap_triton`: Inductor's generated code then launches the kernel itself,
# with no Python of ours per call.
_TRACING = threading.local()


@contextlib.contextmanager
def traced_launches():
    """Launches inside this block are traced into the graph being built rather than run."""
    previous = getattr(_TRACING, "active", False)
    _TRACING.active = True
    try:
        yield
    finally:
        _TRACING.active = previous


def flat_kernel(body, name: str, tuples: dict[str, int]):
    """A kernel `name` running the @triton.jit function `body` with each of its tuple arguments (`tuples`: name ->
    length) taken as that many scalars, `<name>_0`, `<name>_1`, ...: Inductor's generated code launches kernels of
    tensors and scalars only (a tuple argument has no type there). The kernel is written as source next to `body`
    (in its module's globals, its source in linecache), so that Triton and Inductor read it as any other kernel."""
    parameters, arguments = [], []
    for arg, parameter in inspect.signature(body.fn).parameters.items():
        if arg in tuples:
            spread = [f"{arg}_{i}" for i in range(tuples[arg])]
            parameters += spread
            arguments.append(f"({', '.join(spread)},)")
        else:
            parameters.append(f"{arg}: tl.constexpr" if "constexpr" in str(parameter.annotation) else arg)
            arguments.append(arg)
    source = f"def {name}({', '.join(parameters)}):\n    {body.fn.__name__}({', '.join(arguments)})\n"
    filename = f"<fuser kernel {body.fn.__module__}.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = body.fn.__globals__
    exec(compile(source, filename, "exec"), namespace)
    return triton.jit(namespace[name])


# Launching. Triton's own launch path binds every argument, recomputes its specialization and, for an
# autotuned kernel, its tuning key on each call: for the ~60 arguments of an attention kernel that is
# ~90 us of host time per launch on the H100's VM, more than the GPU work of many calls. `launch`
# replays a recorded launch instead when nothing Triton specializes on has changed.

MAX_REPLAYS = 4096
_REPLAYS: dict = {}


def launch(kernel, grid, key, *args, **constexprs):
    """`kernel[grid](*args, **constexprs)`, replayed through the compiled kernel's launcher when the
    launch recorded under `key` had the same argument types, scalar values, constexprs, tensor dtypes
    and 16-byte alignments, on the same device (only tensor addresses differ). A tuple argument (strides,
    sizes: Triton specializes each element) counts as its values and their types; a launch with a
    tuple holding anything but numbers is never replayed. Any difference, the interpreter, or an active
    launch hook (profilers) takes Triton's path, and a new record. Results never depend on `key`: it
    only says which record to try."""
    if getattr(_TRACING, "active", False):
        torch.library.wrap_triton(kernel)[grid](*args, **constexprs)
        return
    replay = _REPLAYS.get(key)
    if replay is not None and replay.accepts(args, constexprs):
        replay.launch(grid, args)
        return
    compiled = kernel[grid](*args, **constexprs)
    if interpreting():
        return
    replay = _Replay.record(kernel, compiled, args, constexprs)
    if replay is not None:
        if len(_REPLAYS) >= MAX_REPLAYS:
            _REPLAYS.clear()
        _REPLAYS[key] = replay


_DTYPE = operator.attrgetter("dtype")
_ADDRESS = torch.Tensor.data_ptr


def _hooks_idle() -> bool:
    """No launch hook is installed (Triton 3.6 keeps None there, later versions an empty chain)."""
    runtime = triton.knobs.runtime
    return all(hook is None or not getattr(hook, "calls", True)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _derived(heuristics, args, params) -> dict:
    """The constexprs a `triton.heuristics` wrapper derives for this call (as its run does)."""
    named, derived = {**dict(zip(heuristics.arg_names, args)), **params}, {}
    for name, rule in heuristics.values.items():
        named[name] = derived[name] = rule(named)
    return derived


def _element_types(tuples: tuple) -> tuple:
    """The types of the tuples' elements, in one flat tuple (the values' equality fixes each tuple's length)."""
    return tuple(map(type, itertools.chain.from_iterable(tuples)))


_NUMBERS = (int, float, bool)


def _picker(positions: tuple):
    """A function returning args at `positions` as a tuple (itemgetter returns a bare item for one)."""
    if not positions:
        return lambda args: ()
    getter = operator.itemgetter(*positions)
    return getter if len(positions) > 1 else lambda args: (getter(args),)


class _Replay:
    """One recorded launch: the compiled kernel, the arguments' fingerprint, the constexpr tail. It holds
    no tensor: a recorded call's tensors (and the autograd graphs behind them) are not kept alive."""

    def __init__(self, compiled, args, constexprs, tail, meta, heuristics, device):
        tensor_positions = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self.pick_tensors = _picker(tensor_positions)
        self.pick_scalars = _picker(tuple(i for i in range(len(args)) if i not in tensor_positions))
        self.pick_tuples = _picker(tuple(i for i, a in enumerate(args) if type(a) is tuple))
        self.types = tuple(map(type, args))
        self.scalars = self.pick_scalars(args)  # tuples compare by value here (1 == 1.0 == True: types below)
        self.tuple_types = _element_types(self.pick_tuples(args))
        tensors = self.pick_tensors(args)
        self.dtypes = tuple(map(_DTYPE, tensors))
        self.alignments = tuple(address % 16 == 0 for address in map(_ADDRESS, tensors))
        self.constexprs = dict(constexprs)
        self.tail, self.meta, self.heuristics, self.device = tail, meta, heuristics, device
        self.run, self.function, self.packed_metadata = compiled.run, compiled.function, compiled.packed_metadata

    @classmethod
    def record(cls, kernel, compiled, args, constexprs) -> "_Replay | None":
        """The replay of a launch Triton just made, None where it cannot be replayed faithfully."""
        if not _hooks_idle() or not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            return None
        jit, params, heuristics = kernel, dict(constexprs), []
        while not isinstance(jit, triton.runtime.JITFunction):  # the wrappers, outermost first, as Triton runs them
            if isinstance(jit, triton.runtime.Autotuner):
                config = jit.best_config
                if config.pre_hook is not None or getattr(jit, "reset_to_zero", None) \
                        or getattr(jit, "restore_value", None):
                    return None
                params.update(config.all_kwargs())
            elif isinstance(jit, triton.runtime.Heuristics):
                heuristics.append((jit, dict(params), _derived(jit, args, params)))
                params.update(heuristics[-1][2])
            else:
                return None
            jit = jit.fn
        bound = inspect.signature(jit.fn).bind(*args, **{k: v for k, v in params.items() if k in jit.arg_names})
        bound.apply_defaults()
        tail = list(bound.arguments.values())[len(args):]
        if any(isinstance(value, torch.Tensor) for value in tail):  # a tensor passed by keyword: not replayed
            return None
        if any(type(value) not in _NUMBERS for a in args if type(a) is tuple for value in a):
            return None  # a tensor or tuple inside a tuple: its fingerprint would not cover it
        meta = {name: None if isinstance(value, torch.Tensor) else value for name, value in bound.arguments.items()}
        return cls(compiled, args, constexprs, tail, meta, heuristics, torch.cuda.current_device())

    def accepts(self, args, constexprs) -> bool:
        if not (tuple(map(type, args)) == self.types and self.pick_scalars(args) == self.scalars
                and constexprs == self.constexprs and torch._C._cuda_getDevice() == self.device and _hooks_idle()
                and _element_types(self.pick_tuples(args)) == self.tuple_types):
            return False
        tensors = self.pick_tensors(args)
        if tuple(map(_DTYPE, tensors)) != self.dtypes:
            return False
        if any(_derived(wrapper, args, params) != derived for wrapper, params, derived in self.heuristics):
            return False  # a heuristic may read more than scalars: it is asked again
        if all(self.alignments):  # the usual case, in C: no address has any of its low four bits set
            return functools.reduce(operator.or_, map(_ADDRESS, tensors), 0) % 16 == 0
        return tuple(address % 16 == 0 for address in map(_ADDRESS, tensors)) == self.alignments

    def launch(self, grid, args):
        grid = grid(self.meta) if callable(grid) else grid
        grid = (*grid, 1, 1)
        runtime = triton.knobs.runtime
        self.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device), self.function,
                 self.packed_metadata, None, runtime.launch_enter_hook, runtime.launch_exit_hook, *args, *self.tail)
