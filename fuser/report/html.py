"""`Report.save_html`: one self-contained page that shows what fuser changed in a model.

The page holds the summary tables and, for each rewritten region, two inline SVG pictures:
the region of the graph before (the matched nodes highlighted, with the nodes that feed
them and use them) and after (the fused op in their place). Nothing is fetched from the
network and no graphviz is needed: regions are small, so a layered layout computed here
(each node one row below its lowest input, rows ordered to keep edges short) reads well.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass

import networkx as nx

from fuser.report import MatchRecord, Report
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
}

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #212529; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #dee2e6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; }
td.mono, th { white-space: nowrap; } td.wide { min-width: 22em; }
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
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fuser report</title>"
             f"<style>{PAGE_STYLE}</style></head><body>",
             f"<h1>fuser: {len(report.matches)} rewrite(s), {len(report.near_misses)} near miss(es)</h1>",
             _counts_line(report), _matches_table(report.matches), _near_misses_table(report)]
    if report.matches:
        parts.append("<h2>Rewritten regions</h2><p class='legend'>"
                     + "".join(f"<span style='background:{fill};border-color:{stroke}'>{role}</span>"
                               for role, (fill, stroke) in ROLE_STYLES.items()) + "</p>")
    for record in report.matches:
        parts.append(_region_section(record, before, after))
    parts.append("</body></html>")
    return "\n".join(parts)


def _counts_line(report: Report) -> str:
    counts = ", ".join(f"{name}: {n}" for name, n in report.counts().items()) or "nothing rewritten"
    return f"<p class='note'>Rewrites by pattern: {html.escape(counts)}</p>"


def _matches_table(matches: list[MatchRecord]) -> str:
    if not matches:
        return "<p class='note'>No site was rewritten.</p>"
    rows = "".join(
        f"<tr><td><a href='#{_anchor(m)}'>{html.escape(m.id or '-')}</a></td><td>{html.escape(m.pattern)}</td>"
        f"<td class='mono'>{html.escape(m.where.module or '<top>')}</td>"
        f"<td class='mono'>{html.escape(_short_location(m.where.location))}</td>"
        f"<td class='mono'>{html.escape(m.op)}</td><td class='wide'>{html.escape(m.mode)}</td><td>{len(m.nodes)}</td></tr>"
        for m in matches)
    return ("<h2>Rewrites</h2><table><tr><th>id</th><th>pattern</th><th>module</th><th>code</th><th>op</th>"
            f"<th>kernel mode</th><th>nodes replaced</th></tr>{rows}</table>")


def _near_misses_table(report: Report) -> str:
    if not report.near_misses:
        return "<p class='note'>No near misses.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(n.pattern)}</td><td class='mono'>{html.escape(n.where.module or '<top>')}</td>"
        f"<td class='mono'>{html.escape(_short_location(n.where.location))}</td><td class='wide'>{html.escape(n.reason)}</td></tr>"
        for n in report.near_misses)
    return ("<h2>Near misses (left as they were)</h2><table><tr><th>pattern</th><th>module</th><th>code</th>"
            f"<th>why it was not rewritten</th></tr>{rows}</table>")


def _short_location(location: str) -> str:
    return location.rsplit("/", 1)[-1]


def _anchor(record: MatchRecord) -> str:
    return "match-" + re.sub(r"[^A-Za-z0-9_-]", "-", record.id or record.replacement)


def _region_section(record: MatchRecord, before: nx.DiGraph, after: nx.DiGraph) -> str:
    matched = {n for n, data in before.nodes(data=True) if data.get("match") == record.id}
    fused = _replacement_nodes(record, before, after)
    title = (f"{html.escape(record.id)} · {html.escape(record.pattern)} at "
             f"<code>{html.escape(record.where.module or '<top>')}</code> "
             f"({html.escape(_short_location(record.where.location))})")
    before_svg = region_svg(before, matched, "matched", f"{record.id}-before")
    after_svg = region_svg(after, fused, "fused", f"{record.id}-after")
    return (f"<section class='region' id='{_anchor(record)}' data-match='{html.escape(record.id)}'>"
            f"<h2>{title}</h2><p class='note'>{html.escape(record.op)}: {html.escape(record.mode)}</p>"
            f"<div class='panels'><div class='panel'><h3>before: {len(matched)} node(s) matched</h3>{before_svg}</div>"
            f"<div class='panel'><h3>after: {html.escape(record.op)}</h3>{after_svg}</div></div></section>")


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


def region_svg(graph: nx.DiGraph, highlighted: set[str], role: str, svg_id: str) -> str:
    """An SVG picture of `highlighted` nodes with their direct inputs and users as context."""
    context = {p for n in highlighted for p in graph.predecessors(n)} | \
              {s for n in highlighted for s in graph.successors(n)}
    region = graph.subgraph(highlighted | context).copy()
    rows = _rows(region, highlighted)
    boxes = _place(region, rows, highlighted, role)
    width = max((b.x + b.width / 2 for b in boxes.values()), default=0) + MARGIN
    height = max((b.y + BOX_HEIGHT / 2 for b in boxes.values()), default=0) + MARGIN
    marker = f"arrow-{re.sub(r'[^A-Za-z0-9_-]', '-', svg_id)}"
    edges = "".join(_edge(boxes[a], boxes[b], marker) for a, b in region.edges)
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


def _place(region: nx.DiGraph, rows: list[list[str]], highlighted: set[str], role: str) -> dict[str, Box]:
    labels = {n: _label(n, region.nodes[n]) for n in region.nodes}
    widths = {n: max(len(labels[n][0]), len(labels[n][1])) * CHAR_WIDTH + 16 for n in region.nodes}
    row_widths = [sum(widths[n] for n in row) + COLUMN_GAP * (len(row) - 1) for row in rows]
    canvas = max(row_widths, default=0) + 2 * MARGIN
    boxes = {}
    for r, (row, row_width) in enumerate(zip(rows, row_widths)):
        x = (canvas - row_width) / 2
        y = MARGIN + BOX_HEIGHT / 2 + r * (BOX_HEIGHT + ROW_GAP)
        for node in row:
            title, detail = labels[node]
            boxes[node] = Box(x + widths[node] / 2, y, widths[node], title, detail,
                              role if node in highlighted else "context", _tooltip(node, region.nodes[node]))
            x += widths[node] + COLUMN_GAP
    return boxes


def _label(name: str, data: dict) -> tuple[str, str]:
    """Two lines: what the node does (op and its literal arguments), and its shape and dtype."""
    if data.get("op") == "placeholder":
        title = readable_input_name(str(data.get("target", name)))
    elif data.get("op") == "output":
        title = "output"
    else:
        args = data.get("args") or ""
        title = f"{data.get('target')}({args})" if args else str(data.get("target"))
        if len(title) > MAX_LABEL:  # the arguments stay in the tooltip
            title = str(data.get("target"))
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
    dashed = " stroke-dasharray='4 3'" if box.role == "context" else ""
    left, top = box.x - box.width / 2, box.y - BOX_HEIGHT / 2
    return (f"<g class='node {box.role}' data-node='{html.escape(name)}'><title>{html.escape(box.tooltip)}</title>"
            f"<rect x='{left:.1f}' y='{top:.1f}' width='{box.width:.1f}' height='{BOX_HEIGHT}' rx='6' "
            f"fill='{fill}' stroke='{stroke}' stroke-width='{2 if box.role != 'context' else 1}'{dashed}/>"
            f"<text x='{box.x:.1f}' y='{box.y - 4:.1f}' text-anchor='middle' font-weight='bold'>"
            f"{html.escape(box.title)}</text>"
            f"<text x='{box.x:.1f}' y='{box.y + 12:.1f}' text-anchor='middle' fill='#495057'>"
            f"{html.escape(box.detail)}</text></g>")


def _edge(source: Box, target: Box, marker: str) -> str:
    x1, y1 = source.x, source.y + BOX_HEIGHT / 2
    x2, y2 = target.x, target.y - BOX_HEIGHT / 2
    bend = max(ROW_GAP, (y2 - y1) / 2)
    return (f"<path class='edge' d='M {x1:.1f} {y1:.1f} C {x1:.1f} {y1 + bend:.1f}, {x2:.1f} {y2 - bend:.1f}, "
            f"{x2:.1f} {y2:.1f}' fill='none' stroke='#495057' stroke-width='1.2' marker-end='url(#{marker})'/>")
