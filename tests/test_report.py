"""Reports a person reads: the graphs before and after as networkx graphs, and the HTML page
with a picture of each rewritten region (checked as structure here, and as pixels in a
headless Chromium where one is installed)."""
import html
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import fuser
from fuser.models import tiny_inputs, tiny_model

MATCHED_FILL, FUSED_FILL = "#ffe3bf", "#c3f0ca"


@pytest.fixture(scope="module")
def llama_report():
    model = tiny_model("llama", layers=1)
    return fuser.explain(model, tiny_inputs(model, batch=2, length=11))


def test_graphs_carry_op_target_shape_dtype_and_match(llama_report):
    before, after = llama_report.graph_before, llama_report.graph_after
    assert llama_report.counts() == {"rms_norm": 3, "attention": 1}
    for record in llama_report.matches:
        replaced = {n for n, data in before.nodes(data=True) if data["match"] == record.id}
        assert {n.split(".", 1)[1] for n in replaced} == set(record.nodes)
        (fused,) = [data for _, data in after.nodes(data=True) if data["match"] == record.id]
        assert fused["target"] == record.op and fused["op"] == "call_function"
    norm = next(m for m in llama_report.matches if m.pattern == "rms_norm")
    rsqrt = next(data for n, data in before.nodes(data=True) if data["match"] == norm.id and data["target"] == "rsqrt")
    assert rsqrt["shape"] == (2, 11, 1) and rsqrt["dtype"] == "float32"
    eps = next(data for n, data in before.nodes(data=True) if data["match"] == norm.id and data["target"] == "add")
    assert eps["args"] == "1e-06"
    assert len(after) < len(before)  # the replaced nodes (and the causal mask the kernel computes) are gone


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside <text> elements, in order."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.texts: list[str] = []
        self._in_text = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_text = tag == "text"

    def handle_endtag(self, tag):
        self._in_text = False

    def handle_data(self, data):
        if self._in_text:
            self.texts.append(data)


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section class='region' id='[^']*' data-match='([^']+)'>(.*?)</section>", page, re.S))


def test_html_has_a_region_per_rewrite_with_highlighted_nodes(llama_report, tmp_path):
    path = tmp_path / "report.html"
    llama_report.save_html(path)
    page = path.read_text()
    sections = _sections(page)
    assert set(sections) == {m.id for m in llama_report.matches}
    for record in llama_report.matches:
        before_svg, after_svg = re.findall(r"<svg .*?</svg>", sections[record.id], re.S)
        before, after = _Elements(before_svg), _Elements(after_svg)
        matched = [a["data-node"].split(".", 1)[1] for tag, a in before.tags if a.get("class") == "node matched"]
        assert sorted(matched) == sorted(record.nodes)
        assert [a for tag, a in after.tags if a.get("class") == "node fused"], record
        assert any(a.get("class") == "node context" for tag, a in before.tags)  # inputs and users shown too
        assert sum(tag == "path" and a.get("class") == "edge" for tag, a in before.tags) >= len(record.nodes)
        assert any(t.startswith(record.op) for t in after.texts)
    norm = next(m for m in llama_report.matches if m.pattern == "rms_norm")
    texts = _Elements(sections[norm.id]).texts
    assert "rsqrt" in texts and "[2, 11, 64] float32" in texts and "add(1e-06)" in texts
    assert any(t.startswith("weight: model.layers.") for t in texts)  # an input: the name it is bound to, its source
    assert "weight = model.layers.0.input_layernorm.weight" in sections[norm.id]  # ... in full
    assert all(len(t) <= 44 for t in texts)


def test_html_names_inputs_arguments_and_source_lines_in_source_order(llama_report, tmp_path):
    llama_report.save_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    sections = _sections(page)
    attention = next(m for m in llama_report.matches if m.pattern == "attention")
    texts = _Elements(sections[attention.id]).texts
    assert {t.split(":")[0] for t in texts if re.match(r"^[qkv]: ", t)} == {"q", "k", "v"}  # the inputs told apart
    norm = next(m for m in llama_report.matches if m.pattern == "rms_norm")
    assert ("fuser::rms_norm(eps=1e-06, weight_offset=0, weight_before_cast=True, out_dtype=float32)"
            in sections[norm.id])  # the fused op's literals by name
    assert "models/llama/modeling_llama.py:" in sections[norm.id]  # the path, and the text of the line
    assert "return self.weight * hidden_states.to(input_dtype)" in sections[norm.id]
    rows = re.findall(r"<tr><td><a href='#match-[^']*'>([^<]+)</a></td><td>(g\d+)</td><td>([a-z_]+)</td>"
                      r"<td class='mono'>([^<]+)</td>", page)
    assert [r[3] for r in rows] == ["model.layers.0.input_layernorm", "model.layers.0.self_attn",
                                    "model.layers.0.post_attention_layernorm", "model.norm"]  # source order
    assert [r[0] for r in rows] == [f"{rows[0][1]}.m{i}" for i in range(4)]  # ids count up with it


def test_html_pictures_each_near_miss_and_where_matching_stopped(tmp_path):
    def exp_scores(q, k, v):  # exp() between the scores and the softmax: not attention (the softmax alone is rewritten)
        return torch.softmax((q @ k.transpose(-1, -2)).exp(), dim=-1) @ v

    report = fuser.explain(exp_scores, *(torch.randn(1, 2, 5, 8) for _ in range(3)))
    (miss,) = [n for n in report.near_misses if n.pattern == "attention"]
    assert miss.stopped and miss.graph and miss.stopped not in miss.nodes, miss
    report.save_html(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    (section,) = re.findall(r"<section class='near-miss' id='near-miss-0' data-near-miss='0'>(.*?)</section>", page,
                            re.S)
    nodes = _Elements(section).tags
    stopped = [a["data-node"] for tag, a in nodes if a.get("class") == "node stopped"]
    assert stopped == [f"{miss.graph}.{miss.stopped}"]
    near = {a["data-node"].split(".", 1)[1] for tag, a in nodes if a.get("class") == "node near"}
    assert near == set(miss.nodes)
    assert html.escape(miss.reason) in section and "<a href='#near-miss-0'>see</a>" in page


def test_a_recompiled_graph_lists_each_site_once(tmp_path):
    """Dynamo compiles a graph again when the sizes change (then with dynamic sizes): its sites are the same
    sites, listed once with the recompile's graph id beside the first."""
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    torch._dynamo.reset()
    fuser.reset_reports()
    compiled = torch.compile(norm, backend="fuser", options={"codegen": "eager", "pictures": True})
    for length in (5, 7):
        compiled(torch.randn(2, length, 16), torch.randn(16))
    report = fuser.last_report()
    assert report.counts() == {"rms_norm": 2} and len(report.sites()) == 1
    first, again = report.sites()[0]
    assert first.graph != again.graph
    assert "1 of the rewrites are recompiles of a graph, listed once" in str(report)
    assert len([line for line in str(report).splitlines() if "fuser::rms_norm" in line]) == 1
    report.save_html(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert len(_sections(page)) == 1 and f"{first.graph} (recompiled: {again.graph})" in page


def _bezier_points(path: str, steps: int = 24) -> list[tuple[float, float]]:
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path)]
    points = list(zip(numbers[::2], numbers[1::2]))
    out = []
    for i in range(0, len(points) - 3, 3):
        p0, p1, p2, p3 = points[i:i + 4]
        for t in np.linspace(0, 1, steps):
            out.append(tuple((1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * b + 3 * (1 - t) * t ** 2 * c + t ** 3 * d
                             for a, b, c, d in zip(p0, p1, p2, p3)))
    return out


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's `dot` (apt-get install graphviz)")
def test_edges_go_around_the_boxes_they_do_not_join(llama_report, tmp_path):
    """With dot laying the pictures out, no edge passes through a box other than the two it joins."""
    llama_report.save_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    for svg in re.findall(r"<svg .*?</svg>", page, re.S):
        boxes = {name: tuple(map(float, xywh)) for name, *xywh in re.findall(
            r"<g class='node [a-z]+' data-node='([^']+)'><title>[^<]*</title><rect x='([\d.]+)' y='([\d.]+)' "
            r"width='([\d.]+)' height='([\d.]+)'", svg)}
        for path in re.findall(r"<path class='edge' d='([^']+)'", svg):
            points = _bezier_points(path)
            touched = {name for name, (x, y, w, h) in boxes.items()
                       if any(x + 2 < px < x + w - 2 and y + 2 < py < y + h - 2 for px, py in points)}
            assert not touched, f"an edge passes through {touched}"


def test_html_is_self_contained(llama_report, tmp_path):
    path = tmp_path / "report.html"
    llama_report.save_html(path)
    page = path.read_text()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|<script|<link|<img|<iframe|@import", page, re.I)
    assert re.findall(r"url\(([^)]*)\)", page) and all(u.startswith("#") for u in re.findall(r"url\(([^)]*)\)", page))


def test_html_lists_near_misses_with_their_reasons(tmp_path):
    def norm_and_softmax_over_dim_1(x, w):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return torch.softmax(h, dim=1)

    report = fuser.explain(norm_and_softmax_over_dim_1, torch.randn(2, 5, 16), torch.randn(16))
    report.save_html(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert report.counts() == {"rms_norm": 1} and report.near_misses
    assert "softmax over dim -2" in page and "Near misses" in page
    assert len(_sections(page)) == 1


def _png_pixels(data: bytes) -> np.ndarray:
    """RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 4 if color == 6 else 3
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height, width * channels), np.int32)
    previous = np.zeros(width * channels, np.int32)
    for y in range(height):
        kind, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            line = row
        elif kind == 2:
            line = (row + previous) % 256
        elif kind == 1:
            line = np.cumsum(row.reshape(width, channels), axis=0).reshape(-1) % 256
        else:
            line = row.copy()
            for x in range(width * channels):
                left = line[x - channels] if x >= channels else 0
                up, up_left = previous[x], previous[x - channels] if x >= channels else 0
                if kind == 3:
                    predicted = (left + up) // 2
                else:
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    predicted = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[x] = (row[x] + predicted) % 256
        out[y], previous = line, line
    return out.reshape(height, width, channels)[..., :3]


def _pixels_of(image: np.ndarray, color: str) -> int:
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - rgb).sum(axis=-1) <= 6).sum())


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's `chromium` on PATH to take a screenshot (apt-get install chromium)")
def test_screenshot_shows_the_pictures(llama_report, tmp_path):
    """What a person sees: the page rendered by a real browser shows highlighted regions."""
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    llama_report.save_html(page)
    run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--window-size=1200,1800",
                          f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), run.stderr[-2000:]
    image = _png_pixels(shot.read_bytes())
    not_white = (image < 245).any(axis=-1).mean()
    assert 0.03 < not_white < 0.9, f"the page looks blank (or all ink): {not_white:.1%} non-white pixels"
    assert _pixels_of(image, MATCHED_FILL) > 10000, "no highlighted (matched) node is visible"
    assert _pixels_of(image, FUSED_FILL) > 4000, "no fused node is visible"
