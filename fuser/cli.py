"""fuser: rewrite naive attention, softmax, RMSNorm and MoE code into fused Triton kernels.

The same verbs as the Python API, for people who do not want to write Python:

  fuser demo llama                          compile a tiny model with backend="fuser", check it
  fuser explain llama --html report.html    what would be rewritten, near misses and why, pictures
  fuser explain my_model.py:make_model      the same for your own model
  fuser fuzz rms_norm softmax               hypothesis against the numerics contract
  fuser fuzz llama                          ... at every site the backend rewrites in a model
  fuser bench                               the GPU benchmarks in benchmarks/
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fuser.logs import showing_progress, step

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


OWN_MODEL = "or give your own model as path/to/file.py:make_model"


class UsageError(Exception):
    """A mistake on the command line: the message says what is wrong and how to fix it."""


class _Parser(argparse.ArgumentParser):
    """An argument mistake is one line (a UsageError), not the usage text."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` (to `high`)."""
    span = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"give a whole number {span}, not {text!r}")
        return number
    return parse


def _new_file(text: str) -> str:
    """An argparse type: a file that can be written (checked before any work is done)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name in it, e.g. {path / 'report.html'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"there is no directory {str(path.parent)!r} to write {path.name} in; "
                                         "create it or give another path")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"the directory {str(path.parent)!r} cannot be written; give another path")
    return text


def _check_device(device: str | None) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        here = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise UsageError(f"--device cuda: this torch ({torch.__version__}) {here}; "
                         "leave --device out (or give --device cpu) to run on the CPU")


def _device_and_dtype(args) -> tuple[str, torch.dtype]:
    _check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    return device, dtype


def demo(args) -> int:
    """Compile a tiny HF-architecture model with backend="fuser", show the rewrites, check the outputs."""
    import fuser
    from fuser.kernels.runtime import what_runs
    from fuser.models import tiny_inputs, tiny_model
    from fuser.numerics.contract import judge, numerics_error

    device, dtype = _device_and_dtype(args)
    arch = _architecture(args.model, "the demo builds one of these; fuser explain and fuser fuzz also take "
                                     "your own model as path/to/file.py:make_model")
    model = tiny_model(arch, layers=args.layers, dtype=dtype).to(device)
    ids = tiny_inputs(model, batch=2, length=args.length).to(device)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"fuser demo: a tiny {arch} ({args.layers} layer{'s' * (args.layers > 1)}, {dtype_name}, {device}), "
          f"torch {torch.__version__}")
    with _step("finding what to rewrite (fuser.explain)"):
        report = fuser.explain(model, ids)
    print(report)

    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(model, backend="fuser", options={"codegen": args.codegen})
    with torch.no_grad():
        with _step(f"compiling with backend='fuser' (codegen={args.codegen}) and running it"):
            start = time.perf_counter()
            logits = compiled(ids).logits
            seconds = time.perf_counter() - start
        with _step("running the model uncompiled, and in float64 for reference"):
            uncompiled = model(ids).logits
            reference = _float64_copy(model)(ids).logits
    counts = fuser.last_report().counts()
    verdict = judge(logits, reference, own=uncompiled)
    problem, bound = verdict.problem, verdict.bound
    print(f"\ncompiled with backend='fuser' (codegen={args.codegen}) in {seconds:.1f} s; rewrites: {counts}")
    print(f"the fused ops ran as {what_runs(device)}")
    print(f"logits vs the same model in float64: relative L2 error {verdict.error:.1e}, "
          f"bound {bound:.0e} ({dtype_name}, or twice the uncompiled model's "
          f"{numerics_error(uncompiled, reference):.1e}): {'OK' if problem is None else 'MISMATCH: ' + problem}")
    return 0 if problem is None and counts else 1


def _step(what: str):
    """`fuser: what ...` on stderr, then how long it took; on a terminal the seconds tick meanwhile."""
    return step(f"fuser: {what}", leave=True)


def _float64_copy(model):
    import copy
    reference = copy.deepcopy(model).double()
    if getattr(reference.config, "_experts_implementation", None) is not None:
        reference.config._experts_implementation = "eager"
    return reference


def _architecture(name: str, otherwise: str = OWN_MODEL) -> str:
    from fuser.models import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}; {otherwise}")
    _require_transformers()
    return name


def _hf_requirement() -> str:
    """The transformers requirement of fuser's [hf] extra, as the installed package's metadata gives it."""
    from importlib.metadata import PackageNotFoundError, requires
    try:
        wanted = [r.split(";")[0].strip() for r in requires("fuser") or () if 'extra == "hf"' in r]
    except PackageNotFoundError:
        wanted = []
    return wanted[0].replace(" ", "") if wanted else "transformers"


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("the architecture models are built with transformers, which is not installed here; "
                         f"pip install '{_hf_requirement()}' (fuser's [hf] extra)") from None


def _is_file_spec(spec: str) -> bool:
    return ":" in spec or spec.endswith(".py")


def _file_and_function(spec: str) -> tuple[str, str]:
    """`path/to/file.py:factory` split, the file checked to exist (before anything runs)."""
    path, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not name:
        raise UsageError(f"name the function that builds the model: {spec}:make_model")
    if not Path(path).is_file():
        raise UsageError(f"no file {path!r} (from {spec!r}); give path/to/file.py:function")
    return path, name


def load_model(spec: str, args) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, args, kwargs) from an architecture name (a tiny model from its config, random token
    ids) or from `path/to/file.py:factory`, a function returning a model or (model, inputs), where
    inputs is a tensor, a tuple of arguments or a dict of keyword arguments."""
    from fuser.models import tiny_inputs, tiny_model

    device, dtype = _device_and_dtype(args)
    if not _is_file_spec(spec):
        model = tiny_model(_architecture(spec), layers=args.layers, dtype=dtype).to(device)
        return model, (tiny_inputs(model, length=args.length).to(device),), {}
    path, name = _file_and_function(spec)
    # registered as a module, as an import would: Dynamo looks up the globals of the code it inlines there
    module_name = Path(path).stem if Path(path).stem not in sys.modules else f"_fuser_user_{Path(path).stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(Path(path).resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        functions = [k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", "") == module.__name__]
        raise UsageError(f"{path} has no function {name!r}; its functions: {', '.join(functions) or 'none'}")
    return _model_and_inputs(factory(), spec)


def _model_and_inputs(built: Any, spec: str) -> tuple[torch.nn.Module, tuple, dict]:
    from fuser.models import tiny_inputs

    model, inputs = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not callable(model):
        raise UsageError(f"{spec} returned {type(model).__name__}; return a model, or (model, inputs)")
    if inputs is None:
        if getattr(getattr(model, "config", None), "vocab_size", None) is None:
            raise UsageError(f"{spec} returned a model but no inputs to run it on; return (model, inputs), "
                             "inputs a tensor, a tuple of arguments or a dict of keyword arguments")
        inputs = tiny_inputs(model).to(next(model.parameters()).device)
    if isinstance(inputs, dict):
        return model, (), inputs
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}


def explain(args) -> int:
    """Print what fuser would rewrite in a model, the near misses and why; --html saves pictures."""
    import fuser

    model, model_args, model_kwargs = load_model(args.model, args)
    with _step("capturing the model with Dynamo and matching the patterns"):
        report = fuser.explain(model, *model_args, **model_kwargs)
    print(report)
    if args.html:
        report.save_html(args.html)
        print(f"\nwrote {args.html}: the tables and a picture of each of the {len(report.matches)} rewritten "
              "region(s) before and after")
    return 0


def fuzz(args) -> int:
    """Fuzz patterns of the library, or every rewritten site of a model, with hypothesis."""
    import fuser
    from fuser.models import ARCHITECTURES
    from fuser.patterns import BY_NAME

    _check_device(args.device)
    for target in args.targets:  # every name checked before anything is fuzzed
        if _is_file_spec(target):
            _file_and_function(target)
        elif target in ARCHITECTURES:
            _require_transformers()
        elif target not in BY_NAME:
            raise UsageError(f"unknown pattern or architecture {target!r}; patterns: {', '.join(BY_NAME)}; "
                             f"architectures: {', '.join(ARCHITECTURES)}; {OWN_MODEL}")
    ok = True
    for target in args.targets or list(BY_NAME):  # progress: each example, over the last one on a terminal
        if target in BY_NAME:
            result = fuser.fuzz(target, max_examples=args.max_examples, seed=args.seed, grads=not args.no_grads,
                                device=args.device)
        else:
            model, model_args, model_kwargs = load_model(target, args)
            result = fuser.fuzz(model, *model_args, max_examples=args.max_examples, seed=args.seed,
                                grads=not args.no_grads, **model_kwargs)
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the progress line
        print(result)
        ok &= result.ok
    return 0 if ok else 1


def _benchmark_scripts() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCHMARKS.glob("bench_*.py"))}


def bench(args) -> int:
    """Run the GPU benchmarks in benchmarks/ (all, or those named), each printing its table."""
    scripts = _benchmark_scripts()
    if not scripts:
        raise UsageError(f"the benchmarks are the scripts in benchmarks/ of a source checkout, and there is none "
                         f"at {BENCHMARKS}; run fuser bench from a clone of the repository (pip install -e .)")
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(scripts) or 'none'}")
    if not torch.cuda.is_available():
        print("fuser bench: the benchmarks time kernels on a GPU and torch sees none here "
              "(torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build "
              "of torch", file=sys.stderr)
        return 1
    chosen = [scripts[n] for n in args.names] if args.names else list(scripts.values())
    failed = []
    for i, script in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {script.name} {' '.join(args.passthrough)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *args.passthrough])
        print(f"[{i}/{len(chosen)}] {script.name}: {'done' if code == 0 else f'FAILED (exit {code})'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(script.name)
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    from fuser.models import ARCHITECTURES, MAX_LENGTH

    parser = _Parser(prog="fuser", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{demo,explain,fuzz,bench}")
    model_help = (f"a transformers architecture, built tiny from its config ({', '.join(ARCHITECTURES)}), "
                  "or path/to/file.py:make_model, a function returning a model or (model, inputs)")

    def model_options(p, what_length: str = "sequence length of the random token ids"):
        p.add_argument("--layers", type=_whole_number(1), default=2,
                       help="layers of a tiny architecture model (default: 2)")
        p.add_argument("--length", type=_whole_number(1, MAX_LENGTH), default=16,
                       help=f"{what_length}, 1 to {MAX_LENGTH} (default: 16)")
        p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="of a tiny architecture model (default: bfloat16 on cuda, float32 on cpu)")

    p = verbs.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    p.add_argument("model", nargs="?", default="llama", metavar="ARCH",
                   help=f"transformers architecture (default: llama): {', '.join(ARCHITECTURES)}")
    model_options(p)
    p.add_argument("--codegen", choices=["inductor", "eager"], default="inductor",
                   help="what runs the rest of the graph (default: inductor)")
    p.set_defaults(run=demo)

    p = verbs.add_parser("explain", help=explain.__doc__, description=explain.__doc__)
    p.add_argument("model", nargs="?", default="llama", metavar="MODEL", help=model_help + " (default: llama)")
    model_options(p)
    p.add_argument("--html", metavar="PATH", type=_new_file,
                   help="also save the report as one self-contained HTML page")
    p.set_defaults(run=explain)

    p = verbs.add_parser("fuzz", help=fuzz.__doc__, description=fuzz.__doc__)
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="pattern names (default: every pattern), or models: " + model_help)
    p.add_argument("--max-examples", type=_whole_number(1), default=100, help="per target (default: 100)")
    p.add_argument("--seed", type=int, help="hypothesis seed, to reproduce a failure (default: random)")
    p.add_argument("--no-grads", action="store_true", help="check values only, not gradients")
    model_options(p)
    p.set_defaults(run=fuzz)

    p = verbs.add_parser("bench", help=bench.__doc__, description=bench.__doc__ +
                         " Arguments after -- go to each script, e.g. fuser bench norm_softmax -- --sweep")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run (default: all): {', '.join(_benchmark_scripts()) or 'none'}")
    p.set_defaults(run=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    command = "fuser"
    try:
        args = _parser().parse_args(argv)  # an argument mistake raises UsageError (_Parser)
        command = f"fuser {args.verb}"
        if passthrough and args.verb != "bench":
            raise UsageError(f"only `fuser bench` passes arguments after --, not `fuser {args.verb}`")
        args.passthrough = passthrough
        with showing_progress(sys.stderr):  # the steps' progress, on a terminal or not
            return args.run(args)
    except UsageError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
