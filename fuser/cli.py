"""The `fuser` command line: demo, explain, fuzz (same verbs as the Python API)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _device_and_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    return device, dtype


def demo(args) -> int:
    """Compile a tiny HF-architecture model with backend="fuser", show the rewrites, check the outputs."""
    import fuser
    from fuser.models import tiny_inputs, tiny_model
    from fuser.verify import numerics_problem, tolerance

    device, dtype = _device_and_dtype(args)
    model = tiny_model(args.arch, layers=args.layers, dtype=dtype).to(device)
    ids = tiny_inputs(model, batch=2, length=args.length).to(device)
    print(f"fuser demo: {args.arch} ({args.layers} layers, {dtype}, {device}), torch {torch.__version__}")
    print(fuser.explain(model, ids))

    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(model, backend="fuser", options={"codegen": args.codegen})
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids).logits
        reference = _float64_copy(model)(ids).logits
    elapsed = time.perf_counter() - start
    counts = fuser.last_report().counts()
    problem = numerics_problem(logits, reference, tolerance(dtype))
    print(f"\ncompiled with backend='fuser' (codegen={args.codegen}) in {elapsed:.1f} s; rewrites: {counts}")
    print(f"logits vs the same model in float64: {'OK' if problem is None else 'MISMATCH: ' + problem}")
    return 0 if problem is None and counts else 1


def _float64_copy(model):
    import copy
    reference = copy.deepcopy(model).double()
    if getattr(reference.config, "_experts_implementation", None) is not None:
        reference.config._experts_implementation = "eager"
    return reference


def explain(args) -> int:
    """Print what fuser would rewrite in a tiny HF-architecture model."""
    import fuser
    from fuser.models import tiny_inputs, tiny_model

    device, dtype = _device_and_dtype(args)
    model = tiny_model(args.arch, layers=args.layers, dtype=dtype).to(device)
    print(fuser.explain(model, tiny_inputs(model, length=args.length).to(device)))
    return 0


def fuzz(args) -> int:
    """Fuzz patterns of the library with hypothesis."""
    import fuser
    from fuser.patterns import BY_NAME

    names = args.patterns or list(BY_NAME)
    ok = True
    for name in names:
        result = fuser.fuzz(name, max_examples=args.max_examples, seed=args.seed)
        print(result)
        ok &= result.ok
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from fuser.models import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="fuser", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def model_arguments(p):
        p.add_argument("arch", nargs="?", default="llama", choices=list(ARCHITECTURES),
                       help="transformers architecture to build from a tiny config (default: llama)")
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--length", type=int, default=16, help="sequence length of the random input")
        p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on cuda, float32 on cpu")

    p = verbs.add_parser("demo", help=demo.__doc__)
    model_arguments(p)
    p.add_argument("--codegen", choices=["inductor", "eager"], default="inductor")
    p.set_defaults(run=demo)
    p = verbs.add_parser("explain", help=explain.__doc__)
    model_arguments(p)
    p.set_defaults(run=explain)
    p = verbs.add_parser("fuzz", help=fuzz.__doc__)
    p.add_argument("patterns", nargs="*", help="pattern names (default: all)")
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--seed", type=int)
    p.set_defaults(run=fuzz)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
