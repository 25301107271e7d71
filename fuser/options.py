"""The options every door takes: `torch.compile(..., backend="fuser", options={...})`, convert, explain, fuzz."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fuser.patterns import BY_NAME, PATTERNS

CODEGENS = ("inductor", "eager")


@dataclass(frozen=True)
class Options:
    """`torch.compile(..., backend="fuser", options={...})`.

    codegen: what runs the rest of the graph, "inductor" (default) or "eager";
    patterns: names of the patterns to use (default: all);
    strict: raise where a site fails instead of keeping the original there;
    verify: on the first call (default), compare each rewritten site with its original, run in float64,
        on the real inputs; a mismatch keeps the original and is reported;
    pictures: keep each graph before and after rewriting in the report (`report.graph_before`,
        `save_html`); `fuser.explain` always does;
    cudagraphs: replay the compiled graph as CUDA graphs, with either codegen (what mode="reduce-overhead"
        does for Inductor, which torch.compile does not let a caller give together with options).
    """
    codegen: str = "inductor"
    patterns: tuple[str, ...] | None = None
    strict: bool = False
    verify: bool = True
    pictures: bool = False
    cudagraphs: bool = False

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "Options":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"fuser: unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"valid options are {', '.join(valid)}")
        if options.get("codegen", "inductor") not in CODEGENS:
            raise ValueError(f"fuser: codegen must be one of {', '.join(CODEGENS)}, not {options['codegen']!r}")
        if not isinstance(options.get("cudagraphs", False), bool):
            raise ValueError(f"fuser: cudagraphs must be True or False, not {options['cudagraphs']!r}")
        if options.get("patterns") is not None:
            names = (options["patterns"],) if isinstance(options["patterns"], str) else tuple(options["patterns"])
            unknown = [n for n in names if n not in BY_NAME]
            if unknown:
                raise ValueError(f"fuser: unknown pattern(s) {', '.join(map(repr, unknown))}; "
                                 f"known patterns are {', '.join(BY_NAME)}")
            options["patterns"] = names
        return cls(**options)

    def selected_patterns(self):
        return PATTERNS if self.patterns is None else tuple(p for p in PATTERNS if p.name in self.patterns)
