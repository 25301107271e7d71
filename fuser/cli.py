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
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


class UsageError(Exception):
    """A mistake on the command line: the message says what is wrong and how to fix it."""


def _device_and_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    return device, dtype


def demo(args) -> int:
    """Compile a tiny HF-architecture model with backend="fuser", show the rewrites, check the outputs."""
    import fuser
    from fuser.models import tiny_inputs, tiny_model
    from fuser.numerics.contract import judge

    device, dtype = _device_and_dtype(args)
    model = tiny_model(_architecture(args.model), layers=args.layers, dtype=dtype).to(device)
    ids = tiny_inputs(model, batch=2, length=args.length).to(device)
    print(f"fuser demo: {args.model} ({args.layers} layers, {dtype}, {device}), torch {torch.__version__}")
    print(fuser.explain(model, ids))

    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(model, backend="fuser", options={"codegen": args.codegen})
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids).logits
        own, reference = model(ids).logits, _float64_copy(model)(ids).logits
    elapsed = time.perf_counter() - start
    counts = fuser.last_report().counts()
    problem = judge(logits, reference, own=own).problem
    print(f"\ncompiled with backend='fuser' (codegen={args.codegen}) in {elapsed:.1f} s; rewrites: {counts}")
    print(f"logits vs the same model in float64: {'OK' if problem is None else 'MISMATCH: ' + problem}")
    return 0 if problem is None and counts else 1


def _float64_copy(model):
    import copy
    reference = copy.deepcopy(model).double()
    if getattr(reference.config, "_experts_implementation", None) is not None:
        reference.config._experts_implementation = "eager"
    return reference


def _architecture(name: str) -> str:
    from fuser.models import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}; "
                         "or give your own model as path/to/file.py:make_model")
    return name


def load_model(spec: str, args) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, args, kwargs) from an architecture name (a tiny model from its config, random token
    ids) or from `path/to/file.py:factory`, a function returning a model or (model, inputs), where
    inputs is a tensor, a tuple of arguments or a dict of keyword arguments."""
    from fuser.models import tiny_inputs, tiny_model

    device, dtype = _device_and_dtype(args)
    if ":" not in spec and not spec.endswith(".py"):
        model = tiny_model(_architecture(spec), layers=args.layers, dtype=dtype).to(device)
        return model, (tiny_inputs(model, length=args.length).to(device),), {}
    path, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not name:
        raise UsageError(f"name the function that builds the model: {spec}:make_model")
    if not Path(path).is_file():
        raise UsageError(f"no file {path!r} (from {spec!r}); give path/to/file.py:function")
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
    from fuser.patterns import BY_NAME

    progress = logging.StreamHandler(sys.stderr)  # one line per example
    logger = logging.getLogger("fuser.fuzz")
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    ok = True
    try:
        for target in args.targets or list(BY_NAME):
            if target in BY_NAME:
                result = fuser.fuzz(target, max_examples=args.max_examples, seed=args.seed, grads=not args.no_grads,
                                    device=args.device)
            else:
                model, model_args, model_kwargs = load_model(target, args)
                result = fuser.fuzz(model, *model_args, max_examples=args.max_examples, seed=args.seed,
                                    grads=not args.no_grads, **model_kwargs)
            print(result)
            ok &= result.ok
    finally:
        logger.removeHandler(progress)
    return 0 if ok else 1


def _benchmark_scripts() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCHMARKS.glob("bench_*.py"))}


def bench(args) -> int:
    """Run the GPU benchmarks in benchmarks/ (all, or those named), each printing its table."""
    scripts = _benchmark_scripts()
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
    from fuser.models import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="fuser", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{demo,explain,fuzz,bench}")
    model_help = (f"a transformers architecture, built tiny from its config ({', '.join(ARCHITECTURES)}), "
                  "or path/to/file.py:make_model, a function returning a model or (model, inputs)")

    def model_options(p, what_length: str = "sequence length of the random token ids"):
        p.add_argument("--layers", type=int, default=2, help="layers of a tiny architecture model (default: 2)")
        p.add_argument("--length", type=int, default=16, help=f"{what_length} (default: 16)")
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
    p.add_argument("--html", metavar="PATH", help="also save the report as one self-contained HTML page")
    p.set_defaults(run=explain)

    p = verbs.add_parser("fuzz", help=fuzz.__doc__, description=fuzz.__doc__)
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="pattern names (default: every pattern), or models: " + model_help)
    p.add_argument("--max-examples", type=int, default=100, help="per target (default: 100)")
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
    parser = _parser()
    args = parser.parse_args(argv)
    if passthrough and args.verb != "bench":
        parser.error(f"only `fuser bench` passes arguments after --, not `fuser {args.verb}`")
    args.passthrough = passthrough
    try:
        return args.run(args)
    except UsageError as error:
        print(f"fuser {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
