"""What a rewrite did, for people and for tests: matches, near misses and why, counts."""
from __future__ import annotations

import linecache
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Where:
    """A site in the user's model: module path and the `file:line` of the code Dynamo traced."""
    module: str
    location: str

    def __str__(self) -> str:
        file_line = self.location.rsplit("/", 1)[-1]
        return f"{self.module or '<top>'} ({file_line})"

    def line_text(self) -> str:
        """The text of the source line (empty where the file cannot be read)."""
        path, _, line = self.location.rpartition(":")
        return linecache.getline(path, int(line)).strip() if line.isdigit() else ""


@dataclass(frozen=True)
class MatchRecord:
    pattern: str
    where: Where
    op: str          # e.g. "fuser::rms_norm"
    mode: str        # the kernel mode chosen, e.g. "weight after cast, eps=1e-06, bfloat16"
    nodes: tuple[str, ...]  # names of the replaced nodes of the original graph
    replacement: str = ""   # name of the fused op's node in the rewritten graph
    id: str = ""            # the `match` attribute of its nodes in `Report.graph_before/after`: `g0.m1`
    inputs: tuple[tuple[str, str], ...] = ()  # (name in the search, e.g. "q"; node of the original graph)

    @property
    def graph(self) -> str:
        """The id of the FX graph it was found in (`g0`): one per graph Dynamo compiled."""
        return self.id.rpartition(".")[0]


@dataclass(frozen=True)
class NearMiss:
    pattern: str
    where: Where
    reason: str
    nodes: tuple[str, ...] = ()   # the nodes it covered (or reached) in the original graph
    stopped: str = ""             # the node where matching stopped, when that is why
    graph: str = ""               # the id of its FX graph (`g0`), where pictures were kept


@dataclass(frozen=True)
class GraphBreak:
    """Code Dynamo did not hand to fuser: where its graph stopped (the innermost module whose forward holds
    the line, and the line), why, whether it ran the whole function eagerly (`skipped`: a break in a loop),
    and what `fuser.convert` would do with that module instead (empty if nothing)."""
    where: Where
    reason: str
    skipped: bool
    convert: str = ""


@dataclass
class Report:
    matches: list[MatchRecord] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    graphs: list[tuple[Any, Any]] = field(default_factory=list)  # (before, after) networkx graphs per FX graph
    notes: list[str] = field(default_factory=list)  # what was not tried at all, and how to have it tried
    graph_breaks: list[GraphBreak] = field(default_factory=list)  # `fuser.explain` only

    @property
    def graph_before(self):
        """The canonical torch-level graph(s) before rewriting, as one networkx.DiGraph."""
        return _union([before for before, _ in self.graphs])

    @property
    def graph_after(self):
        return _union([after for _, after in self.graphs])

    def counts(self) -> dict[str, int]:
        return dict(Counter(m.pattern for m in self.matches))

    def sites(self) -> list[list[MatchRecord]]:
        """The matches by site, in source order: the records of one site are the same rewrite found again in
        other graphs (a graph Dynamo compiled again, e.g. for dynamic shapes), first graph first."""
        found: dict[tuple, list[MatchRecord]] = {}
        for m in self.matches:
            key = (m.pattern, m.where, m.op, m.mode, len(m.nodes))
            if key in found and m.graph in {r.graph for r in found[key]}:
                key += (m.id,)  # two sites of one graph at the same code (a loop): both kept
            found.setdefault(key, []).append(m)
        return list(found.values())

    def extend(self, other: "Report") -> None:
        self.matches += other.matches
        self.near_misses += other.near_misses
        self.graphs += other.graphs
        self.notes += other.notes
        self.graph_breaks += other.graph_breaks

    def save_html(self, path) -> None:
        """One self-contained page (no network): the summary tables and, for each rewritten
        region, a picture of the graph before and after with the matched nodes highlighted."""
        from fuser.report.html import report_html
        with open(path, "w", encoding="utf-8") as file:
            file.write(report_html(self))

    def __str__(self) -> str:
        sites = self.sites()
        again = len(self.matches) - len(sites)
        lines = [f"fuser: {len(self.matches)} rewrite(s), {len(self.near_misses)} near miss(es)"
                 + (f"; {again} of the rewrites are recompiles of a graph, listed once" if again else "")]
        if self.matches:
            lines.append(_table(["pattern", "where", "op", "mode"] + ["graphs"] * bool(again),
                                [[m.pattern, str(m.where), m.op, m.mode] + [", ".join(r.graph for r in records)] *
                                 bool(again) for records in sites for m in records[:1]]))
        if self.near_misses:
            lines.append("near misses (left as they were):")
            lines.append(_table(["pattern", "where", "reason"],
                                [[n.pattern, str(n.where), n.reason] for n in self.near_misses]))
        if self.graph_breaks:
            lines.append("graph breaks (code Dynamo did not hand to fuser):")
            lines.append(_table(["where", "reason", "instead"], [
                [str(b.where), b.reason + (" (Dynamo ran the whole function eagerly)" if b.skipped else ""),
                 b.convert or "-"] for b in self.graph_breaks]))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _union(graphs):
    import networkx as nx
    return nx.union_all(graphs) if graphs else nx.DiGraph()


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in rows]
    return "\n".join("  " + line.rstrip() for line in out)
