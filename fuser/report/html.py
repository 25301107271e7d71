"""`Report.save_html`: one self-contained page that shows what fuser changed in a model.

The page holds the summary tables (one row per site: a graph Dynamo compiled again, for dynamic shapes, shows
as a recompile of the first), the source path and line of each site, and inline SVG pictures: for each
rewritten region the graph before (the matched nodes highlighted, with the nodes that feed them, labeled by the
names the match bound, and those that use them) and after (the fused op in their place, its literals by name);
for each near miss what it matched and the node where matching stopped. Nothing is fetched from the network.
Graphviz's `dot` lays the pictures out where it is installed (Debian's `graphviz`: its edges go around the
boxes they do not join); without it a layered layout computed here (each node one row below its lowest input,
rows ordered to keep edges short) is used.
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from dataclasses import dataclass

import networkx as nx

from fuser.report import MatchRecord, NearMiss, Report
from fuser.report.graphs import readable_input_name

FONT_SIZE = 12
CHAR_WIDTH = 7.3        # of the monospace font at FONT_SIZE, in pixels
BOX_HEIGHT = 40
ROW_GAP = 34
COLUMN_GAP = 18
MARGIN = 12
MAX_LABEL = 44          # characters; longer labels are shortened in the middle (the full text is a tooltip)

ROLE_STYLES = {  # fill, stroke
    "matched": ("#ffe3bf", "#e8590c"),      # nodes a match replaced (before)
    "fused": ("#c3f0ca", "#2b8a3e"),        # the fused op that replaced them (after)
    "context": ("#f1f3f5", "#868e96"),      # what feeds the region and what uses it
    "near": ("#fff3bf", "#f08c00"),         # what a near miss matched before it was turned down
    "stopped": ("#ffc9c9", "#e03131"),      # the node where matching stopped
}
REGION_ROLES, NEAR_MISS_ROLES = ("matched", "fused", "context"), ("near", "stopped", "context")

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #212529; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #dee2e6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; }
td.mono, th { white-space: nowrap; } td.wide { min-width: 22em; }
td.code { white-space: normal; max-width: 34em; } .line { display: block; color: #495057; font-size: 12px; }
.region { border: 1px solid #dee2e6; border-radius: 6px; padding: 12px; margin: 16px 0; }
.panels { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.panel h3 { font-size: 14px; margin: 4px 0 8px; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border: 1px solid; border-radius: 4px; }
.note { color: #495057; font-size: 13px; }
svg text { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
"""


@dataclass(frozen=True)
class Box:
    """A node placed on the picture: its centre, size and the two lines of its label."""
    x: float
    y: float
    width: float
    title: str
    detail: str
    role: str
    tooltip: str


def report_html(report: Report) -> str:
    """The whole page as a string."""
    before, after = report.graph_before, report.graph_after
    sites = report.sites()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fuser report</title>"
             f"<style>{PAGE_STYLE}</style></head><body>",
             f"<h1>fuser: {_headline(report, sites)}</h1>",
             _counts_line(report), _matches_table(sites), _near_misses_table(report)]
    if report.matches:
        parts.append("<h2>Rewritten regions</h2>" + _legend(REGION_ROLES))
    for records in sites:
        parts.append(_region_section(records, before, after))
    pictured = [miss for miss in report.near_misses if miss.graph and miss.nodes]
    if pictured:
        parts.append("<h2>Near misses: what almost matched, and where it stopped</h2>" + _legend(NEAR_MISS_ROLES))
    for i, miss in enumerate(pictured):
        parts.append(_near_miss_section(i, miss, before))
    parts.append("</body></html>")
    return "\n".join(parts)


def _headline(report: Report, sites: list[list[MatchRecord]]) -> str:
    graphs = {r.graph for r in report.matches} | {n.graph for n in report.near_misses if n.graph}
    text = f"{len(sites)} site(s) rewritten, {len(report.near_misses)} near miss(es)"
    return text + (f" in {len(graphs)} graphs" if len(graphs) > 1 else "")


def _legend(roles: tuple[str, ...]) -> str:
    return "<p class='legend'>" + "".join(f"<span style='background:{ROLE_STYLES[r][0]};border-color:"
                                          f"{ROLE_STYLES[r][1]}'>{r}</span>" for r in roles) + "</p>"


def _counts_line(report: Report) -> str:
    counts = ", ".join(f"{name}: {n}" for name, n in report.counts().items()) or "nothing rewritten"
    return f"<p class='note'>Rewrites by pattern: {html.escape(counts)}</p>"


def _code(where) -> str:
    """The source of a site: its path (the whole path as a tooltip) and the text of its line."""
    text = where.line_text()
    return (f"<span title='{html.escape(where.location)}'>{html.escape(_short_location(where.location))}</span>"
            + (f"<span class='line'>{html.escape(text)}</span>" if text else ""))


def _matches_table(sites: list[list[MatchRecord]]) -> str:
    if not sites:
        return "<p class='note'>No site was rewritten.</p>"
    rows = "".join(
        f"<tr><td><a href='#{_anchor(m)}'>{html.escape(m.id or '-')}</a></td><td>{html.escape(_graphs(records))}</td>"
        f"<td>{html.escape(m.pattern)}</td><td class='mono'>{html.escape(m.where.module or '<top>')}</td>"
        f"<td class='mono code'>{_code(m.where)}</td><td class='mono'>{html.escape(m.op)}</td>"
        f"<td class='wide'>{html.escape(m.mode)}</td><td>{len(m.nodes)}</td></tr>"
        for records in sites for m in records[:1])
    return ("<h2>Rewrites</h2><table><tr><th>id</th><th>graph</th><th>pattern</th><th>module</th><th>code</th>"
            f"<th>op</th><th>kernel mode</th><th>nodes replaced</th></tr>{rows}</table>")


def _graphs(records: list[MatchRecord]) -> str:
    """The graph a site was rewritten in, and the recompiles of it that rewrote it again."""
    first, *again = [r.graph for r in records]
    return first + (f" (recompiled: {', '.join(again)})" if again else "")


def _near_misses_table(report: Report) -> str:
    if not report.near_misses:
        return "<p class='note'>No near misses.</p>"
    pictured = iter(range(len(report.near_misses)))
    rows = "".join(
        f"<tr><td>{_near_miss_link(n, pictured)}</td><td>{html.escape(n.graph or '-')}</td>"
        f"<td>{html.escape(n.pattern)}</td><td class='mono'>{html.escape(n.where.module or '<top>')}</td>"
        f"<td class='mono code'>{_code(n.where)}</td><td class='wide'>{html.escape(n.reason)}</td></tr>"
        for n in report.near_misses)
    return ("<h2>Near misses (left as they were)</h2><table><tr><th>picture</th><th>graph</th><th>pattern</th>"
            f"<th>module</th><th>code</th><th>why it was not rewritten</th></tr>{rows}</table>")


def _near_miss_link(miss: NearMiss, pictured) -> str:
    return f"<a href='#near-miss-{next(pictured)}'>see</a>" if miss.graph and miss.nodes else "-"


def _short_location(location: str) -> str:
    """The last three parts of the path and the line: `models/llama/modeling_llama.py:67`."""
    return "/".join(location.split("/")[-3:])


def _anchor(record: MatchRecord) -> str:
    return "match-" + re.sub(r"[^A-Za-z0-9_-]", "-", record.id or record.replacement)


def _region_section(records: list[MatchRecord], before: nx.DiGraph, after: nx.DiGraph) -> str:
    record = records[0]
    matched = {n for n, data in before.nodes(data=True) if data.get("match") == record.id}
    fused = _replacement_nodes(record, before, after)
    prefix = record.graph + "."
    names = {prefix + node: name for name, node in record.inputs}
    title = (f"{html.escape(record.id)} · {html.escape(record.pattern)} at "
             f"<code>{html.escape(record.where.module or '<top>')}</code> "
             f"({html.escape(_short_location(record.where.location))})")
    again = (f"<p class='note'>Rewritten the same way again in {html.escape(', '.join(r.graph for r in records[1:]))}"
             " (recompiles of this graph, e.g. for dynamic shapes): shown once.</p>" if len(records) > 1 else "")
    inputs = ", ".join(f"{name} = {_node_name(before, prefix + node)}" for name, node in record.inputs)
    before_svg = region_svg(before, matched, {n: "matched" for n in matched}, f"{record.id}-before", names)
    after_svg = region_svg(after, fused, {n: "fused" for n in fused}, f"{record.id}-after", names)
    return (f"<section class='region' id='{_anchor(record)}' data-match='{html.escape(record.id)}'>"
            f"<h2>{title}</h2><p class='note'>{html.escape(record.op)}: {html.escape(record.mode)}</p>"
            f"<p class='note'>code: {_code(record.where)}</p>"
            + (f"<p class='note'>inputs: <code>{html.escape(inputs)}</code></p>" if inputs else "") + again +
            f"<div class='panels'><div class='panel'><h3>before: {len(matched)} node(s) matched</h3>{before_svg}</div>"
            f"<div class='panel'><h3>after: {html.escape(record.op)}</h3>{_call(record, after)}{after_svg}</div>"
            "</div></section>")


def _call(record: MatchRecord, after: nx.DiGraph) -> str:
    """The fused op's literal arguments by name (`eps=1e-06, ...`), which its box may be too small for."""
    data = after.nodes.get(record.graph + "." + record.replacement, {})
    return f"<p class='note'><code>{html.escape(record.op)}({html.escape(data.get('args') or '')})</code></p>"


def _node_name(graph: nx.DiGraph, node: str) -> str:
    """A node as people name it: an input by its source (`model.layers.0.norm.weight`), else its FX name."""
    data = graph.nodes[node] if node in graph else {}
    if data.get("op") == "placeholder":
        return readable_input_name(str(data.get("target", node)))
    return node.split(".", 1)[-1]


def _near_miss_section(i: int, miss: NearMiss, before: nx.DiGraph) -> str:
    prefix = miss.graph + "."
    nodes = {prefix + n for n in miss.nodes if prefix + n in before}
    roles = {n: "stopped" if miss.stopped and n == prefix + miss.stopped else "near" for n in nodes}
    if miss.stopped and prefix + miss.stopped in before:
        nodes.add(prefix + miss.stopped)
        roles[prefix + miss.stopped] = "stopped"
    where = f"stopped at <code>{html.escape(miss.stopped)}</code>; " if miss.stopped else ""
    return (f"<section class='near-miss' id='near-miss-{i}' data-near-miss='{i}'>"
            f"<h2>{html.escape(miss.pattern)} at <code>{html.escape(miss.where.module or '<top>')}</code> "
            f"({html.escape(_short_location(miss.where.location))}), graph {html.escape(miss.graph)}</h2>"
            f"<p class='note'>code: {_code(miss.where)}</p><p class='note'>{where}{html.escape(miss.reason)}</p>"
            f"{region_svg(before, nodes, roles, f'{prefix}near-{i}', {})}</section>")


def _replacement_nodes(record: MatchRecord, before: nx.DiGraph, after: nx.DiGraph) -> set[str]:
    """The node tagged with the match id and the nodes the replacement created to feed it (the
    fused op before a cast back, say): nodes of the graph after that the graph before lacks."""
    found = {n for n, data in after.nodes(data=True) if data.get("match") == record.id}
    pending = list(found)
    while pending:
        for source in after.predecessors(pending.pop()):
            if source not in before and source not in found:
                found.add(source)
                pending.append(source)
    return found


def region_svg(graph: nx.DiGraph, highlighted: set[str], roles: dict[str, str], svg_id: str,
               names: dict[str, str]) -> str:
    """An SVG picture of `highlighted` nodes (each in its role's colours) with their direct inputs and users as
    context; an input the match bound to a name of its search (q, k, v, x, weight) is labeled with it."""
    context = {p for n in highlighted for p in graph.predecessors(n)} | \
              {s for n in highlighted for s in graph.successors(n)}
    region = graph.subgraph(highlighted | context).copy()
    labels = {n: _label(n, region.nodes[n], names.get(n)) for n in region.nodes}
    widths = {n: max(len(labels[n][0]), len(labels[n][1])) * CHAR_WIDTH + 16 for n in region.nodes}
    laid_out = _dot_layout(region, widths) if shutil.which("dot") else None
    if laid_out is None:
        boxes = _place(region, _rows(region, highlighted), widths, labels, roles)
        paths = {(a, b): _curve(boxes[a], boxes[b]) for a, b in region.edges}
    else:
        centres, paths = laid_out
        boxes = {n: Box(x, y, widths[n], *labels[n], roles.get(n, "context"), _tooltip(n, region.nodes[n]))
                 for n, (x, y) in centres.items()}
    width = max((b.x + b.width / 2 for b in boxes.values()), default=0) + MARGIN
    height = max((b.y + BOX_HEIGHT / 2 for b in boxes.values()), default=0) + MARGIN
    marker = f"arrow-{re.sub(r'[^A-Za-z0-9_-]', '-', svg_id)}"
    edges = "".join(_edge(paths[a, b], marker) for a, b in region.edges)
    nodes = "".join(_box(name, box) for name, box in boxes.items())
    return (f"<svg class='region-picture' data-region='{html.escape(svg_id)}' width='{width:.0f}' "
            f"height='{height:.0f}' viewBox='0 0 {width:.0f} {height:.0f}' role='img'>"
            f"<defs><marker id='{marker}' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' markerHeight='7' "
            f"orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z' fill='#495057'/></marker></defs>"
            f"{edges}{nodes}</svg>")


def _rows(region: nx.DiGraph, highlighted: set[str]) -> list[list[str]]:
    """Each node one row below its lowest input; inputs from outside the region sit right above
    their first user, so long edges stay few. Rows are ordered by the mean position of each
    node's inputs (two sweeps of the barycentre heuristic)."""
    order = list(nx.topological_sort(region))
    depth: dict[str, int] = {}
    for node in order:
        preds = [depth[p] for p in region.predecessors(node)]
        depth[node] = max(preds) + 1 if preds else 0
    for node in order:  # pull sources down next to their first user
        users = [depth[s] for s in region.successors(node)]
        if not list(region.predecessors(node)) and users:
            depth[node] = min(users) - 1
    rows: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node in order:
        rows[depth[node]].append(node)
    for neighbours in (region.predecessors, region.successors):
        sweep = rows[1:] if neighbours == region.predecessors else rows[-2::-1]
        position = {n: i for row in rows for i, n in enumerate(row)}
        for row in sweep:
            def barycentre(node: str) -> float:
                linked = [position[n] for n in neighbours(node)]
                return sum(linked) / len(linked) if linked else position[node]
            row.sort(key=barycentre)
            position.update({n: i for i, n in enumerate(row)})
    return [row for row in rows if row]


def _dot_layout(region: nx.DiGraph, widths: dict[str, float]
                ) -> tuple[dict[str, tuple[float, float]], dict[tuple[str, str], str]] | None:
    """Box centres and edge paths laid out by Graphviz's `dot` (its edges go around the boxes they do not
    join), in source order where it can; None where dot fails."""
    ids = {n: f"n{i}" for i, n in enumerate(region.nodes)}
    lines = [f"digraph {{ nodesep={COLUMN_GAP / 72:.3f}; ranksep={ROW_GAP / 72:.3f}; splines=spline;",
             "node [shape=box, fixedsize=true, label=\"\"]; edge [arrowhead=none];"]
    lines += [f"{ids[n]} [width={widths[n] / 72:.3f}, height={BOX_HEIGHT / 72:.3f}];" for n in region.nodes]
    lines += [f"{ids[a]} -> {ids[b]};" for a, b in region.edges]
    try:
        run = subprocess.run(["dot", "-Tplain"], input="\n".join(lines) + "}", capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    by_id, centres, paths, height = {v: k for k, v in ids.items()}, {}, {}, 0.0
    for line in run.stdout.splitlines():
        kind, *fields = line.split()
        if kind == "graph":
            height = float(fields[2])

        def point(x: str, y: str) -> tuple[float, float]:  # inches from the bottom left -> pixels from the top left
            return MARGIN + float(x) * 72, MARGIN + (height - float(y)) * 72
        if kind == "node":
            centres[by_id[fields[0]]] = point(fields[1], fields[2])
        elif kind == "edge":
            n = int(fields[2])
            xy = [point(fields[3 + 2 * i], fields[4 + 2 * i]) for i in range(n)]
            paths[by_id[fields[0]], by_id[fields[1]]] = f"M {xy[0][0]:.1f} {xy[0][1]:.1f} " + " ".join(
                f"C {a[0]:.1f} {a[1]:.1f}, {b[0]:.1f} {b[1]:.1f}, {c[0]:.1f} {c[1]:.1f}"
                for a, b, c in zip(xy[1::3], xy[2::3], xy[3::3]))
    return (centres, paths) if len(centres) == len(region) and len(paths) == region.number_of_edges() else None


def _place(region: nx.DiGraph, rows: list[list[str]], widths: dict[str, float], labels: dict[str, tuple[str, str]],
           roles: dict[str, str]) -> dict[str, Box]:
    row_widths = [sum(widths[n] for n in row) + COLUMN_GAP * (len(row) - 1) for row in rows]
    canvas = max(row_widths, default=0) + 2 * MARGIN
    boxes = {}
    for r, (row, row_width) in enumerate(zip(rows, row_widths)):
        x = (canvas - row_width) / 2
        y = MARGIN + BOX_HEIGHT / 2 + r * (BOX_HEIGHT + ROW_GAP)
        for node in row:
            title, detail = labels[node]
            boxes[node] = Box(x + widths[node] / 2, y, widths[node], title, detail, roles.get(node, "context"),
                              _tooltip(node, region.nodes[node]))
            x += widths[node] + COLUMN_GAP
    return boxes


def _label(name: str, data: dict, bound: str | None = None) -> tuple[str, str]:
    """Two lines: what the node does (op and its literal arguments; `q: ` before it where the match bound it
    to a name), and its shape and dtype."""
    if data.get("op") == "placeholder":
        title = readable_input_name(str(data.get("target", name)))
    elif data.get("op") == "output":
        title = "output"
    else:
        args = data.get("args") or ""
        title = f"{data.get('target')}({args})" if args else str(data.get("target"))
        if len(title) > MAX_LABEL:  # the arguments stay in the tooltip
            title = str(data.get("target"))
    title = f"{bound}: {title}" if bound else title
    shape = data.get("shape")
    detail = (f"[{', '.join(map(str, shape))}] {data.get('dtype') or ''}".strip() if shape is not None
              else data.get("dtype") or "")
    return _shorten(title), _shorten(detail)


def _shorten(text: str) -> str:
    if len(text) <= MAX_LABEL:
        return text
    keep = (MAX_LABEL - 1) // 2
    return text[:keep] + "…" + text[-keep:]


def _tooltip(name: str, data: dict) -> str:
    return f"{name.split('.', 1)[-1]}: {data.get('op')} {data.get('target')}({data.get('args') or ''})"


def _box(name: str, box: Box) -> str:
    fill, stroke = ROLE_STYLES[box.role]
    dashed = " stroke-dasharray='4 3'" if box.role == "context" else ""  # context: not part of the site
    left, top = box.x - box.width / 2, box.y - BOX_HEIGHT / 2
    return (f"<g class='node {box.role}' data-node='{html.escape(name)}'><title>{html.escape(box.tooltip)}</title>"
            f"<rect x='{left:.1f}' y='{top:.1f}' width='{box.width:.1f}' height='{BOX_HEIGHT}' rx='6' "
            f"fill='{fill}' stroke='{stroke}' stroke-width='{2 if box.role != 'context' else 1}'{dashed}/>"
            f"<text x='{box.x:.1f}' y='{box.y - 4:.1f}' text-anchor='middle' font-weight='bold'>"
            f"{html.escape(box.title)}</text>"
            f"<text x='{box.x:.1f}' y='{box.y + 12:.1f}' text-anchor='middle' fill='#495057'>"
            f"{html.escape(box.detail)}</text></g>")


def _curve(source: Box, target: Box) -> str:
    """The edge of the built-in layout: one cubic from the bottom of `source` to the top of `target`."""
    x1, y1 = source.x, source.y + BOX_HEIGHT / 2
    x2, y2 = target.x, target.y - BOX_HEIGHT / 2
    bend = max(ROW_GAP, (y2 - y1) / 2)
    return f"M {x1:.1f} {y1:.1f} C {x1:.1f} {y1 + bend:.1f}, {x2:.1f} {y2 - bend:.1f}, {x2:.1f} {y2:.1f}"


def _edge(path: str, marker: str) -> str:
    return (f"<path class='edge' d='{path}' fill='none' stroke='#495057' stroke-width='1.2' "
            f"marker-end='url(#{marker})'/>")
