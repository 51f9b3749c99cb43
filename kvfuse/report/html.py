"""The report as one self-contained HTML file: no network, no CDN — inline CSS, a few lines of
JavaScript to sort tables, <details> per layer, and inline SVG pictures of one layer before
and after the rewrite."""

from __future__ import annotations

import collections
import html
import json

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0;cursor:pointer}th:after{content:" ⇅";color:#999}
.pos{color:#070}.neg{color:#b00}code{background:#f6f6f6;padding:0 3px}
.pictures{display:flex;gap:2em;flex-wrap:wrap}svg{border:1px solid #ddd;background:#fcfcfc}
details{margin:.3em 0}summary{cursor:pointer}.bad{color:#b00;font-weight:bold}
"""

SORT = """
document.querySelectorAll('table.sortable th').forEach(function (th, column) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.up !== '1'; th.dataset.up = up ? '1' : '0';
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.v || a.cells[column].textContent;
      var y = b.cells[column].dataset.v || b.cells[column].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def to_html(report: dict) -> str:
    a, b = report["models"]["a"], report["models"]["b"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvfuse graph diff</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>kvfuse graph diff</h1>",
        f"<p><code>{_e(a['path'])}</code> → <code>{_e(b['path'])}</code></p>",
        _table(
            ["", "before", "after"],
            [
                ["nodes", a["nodes"], b["nodes"]],
                ["initializers", a["initializers"], b["initializers"]],
                [
                    "initializer MB",
                    f"{a['initializer_bytes'] / 1e6:.1f}",
                    f"{b['initializer_bytes'] / 1e6:.1f}",
                ],
                ["file MB", f"{a['file_bytes'] / 1e6:.1f}", f"{b['file_bytes'] / 1e6:.1f}"],
                ["opsets", json.dumps(a["opsets"]), json.dumps(b["opsets"])],
            ],
            table_id="summary",
        ),
        "<h2>Ops</h2>",
        _table(
            ["op", "before", "after", "Δ"],
            [[r["op"], r["a"], r["b"], _delta(r["delta"])] for r in report["ops"]],
            table_id="ops",
        ),
        "<h2>Inputs and outputs</h2>",
        _table(
            ["kind", "name", "change", "before", "after", "became static (axes)"],
            [
                [
                    kind[:-1],
                    f"<code>{_e(r['name'])}</code>",
                    r["change"],
                    _e(str(r["a"])),
                    _e(str(r["b"])),
                    ", ".join(map(str, r["became_static"])),
                ]
                for kind in ("inputs", "outputs")
                for r in report["io"][kind]
            ],
            table_id="io",
            raw=True,
        ),
        _aliases(report),
        _pictures(report),
        _rewrites(report),
        _layers(report),
        _numerics(report),
        f"<script>{SORT}</script></body></html>",
    ]
    return "\n".join(parts)


def _e(text) -> str:
    return html.escape(str(text))


def _delta(delta: int) -> str:
    return f"{delta:+d}"


def _table(header, rows, table_id: str, raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell if raw else _e(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return (
        f"<table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _aliases(report: dict) -> str:
    aliases = report["io"]["aliases"]
    if not aliases:
        return ""
    return (
        f"<p>{len(aliases)} outputs are the same buffer as an input (retained-state KV, "
        f"updated in place), e.g. <code>{_e(aliases[0]['output'])}</code> ≡ "
        f"<code>{_e(aliases[0]['input'])}</code>.</p>"
    )


def _rewrites(report: dict) -> str:
    if not report["rewrites"]:
        s = report["structural"]
        return (
            f"<h2>Structural diff</h2><p>{s['removed']} nodes removed, {s['added']} added, "
            f"{s['kept']} kept (by name).</p>"
            + _table(["op", "removed"], list(s["removed_by_op"].items()), "removed")
        )
    counts = collections.Counter()
    for rewrite in report["rewrites"]:
        counts[rewrite["rule"]] += len(rewrite["replaced"])
    rows = [[rule, n, counts[rule]] for rule, n in report["rewrites_by_rule"].items()]
    by_layer = collections.defaultdict(list)
    for rewrite in report["rewrites"]:
        by_layer[rewrite["layer"] or "-"].append(rewrite)
    sections = []
    for layer in sorted(by_layer, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        items = "".join(
            f"<li><b>{_e(r['rule'])}</b> → <code>{_e(r['op_type'])}</code> "
            f"<code>{_e(r['node'])}</code> replaced {len(r['replaced'])}: "
            + ", ".join(f"{_e(x['op_type'])} <code>{_e(x['name'])}</code>" for x in r["replaced"])
            + "</li>"
            for r in by_layer[layer]
        )
        sections.append(
            f"<details><summary>layer {_e(layer)}: {len(by_layer[layer])} rewrites"
            f"</summary><ul>{items}</ul></details>"
        )
    return (
        "<h2>Rewrites</h2>"
        + _table(["rule", "nodes created", "input nodes replaced"], rows, "rules")
        + "".join(sections)
    )


def _layers(report: dict) -> str:
    if not report["layers"]:
        return ""
    fused = sum(layer["fused"] for layer in report["layers"])
    rows = [
        [m["layer"], m["rule"], m["matched_nodes"], m["reason"], ", ".join(m["culprits"])]
        for m in report["near_misses"]
    ]
    misses = (
        _table(
            ["layer", "closest rule", "nodes matched", "why not", "culprits"], rows, "near_misses"
        )
        if rows
        else "<p>No near misses: every layer fused.</p>"
    )
    lowered = [
        [layer["layer"], layer["lowering"], layer["lowering_reason"]]
        for layer in report["layers"]
        if layer.get("lowering")
    ]
    lowerings = _table(["layer", "lowering", "why"], lowered, "lowerings") if lowered else ""
    return (
        f"<h2>Attention layers</h2><p>{fused} of {len(report['layers'])} fused.</p>{misses}"
        f"{lowerings}"
    )


def _numerics(report: dict) -> str:
    numerics = report["numerics"]
    if numerics is None:
        return "<h2>Numerics</h2><p>Not verified.</p>"
    verdict = "passed" if numerics["passed"] else "<span class='bad'>FAILED</span>"
    rows = [
        [
            s["step"],
            f"{s['max_abs_diff']:.2e}",
            f"{s['tolerance_used']:.2f}",
            s["token_original"],
            s["token_rewritten"],
        ]
        for s in numerics["steps"]
    ]
    return (
        f"<h2>Numerics</h2><p>Verification {verdict}: max |Δlogits| "
        f"{numerics['max_abs_diff']:.2e} (atol {numerics['atol']}, rtol {numerics['rtol']}),"
        f" greedy tokens {'equal' if numerics['tokens_equal'] else 'differ'}.</p>"
        + _table(
            ["step", "max abs Δ", "tolerance used", "token before", "token after"], rows, "numerics"
        )
    )


def _pictures(report: dict) -> str:
    picture = report.get("picture")
    if not picture:
        return ""
    return (
        f"<h2>Layer {_e(picture['layer'])} attention, before and after "
        f"({_e(picture['rule'])})</h2><div class='pictures'>"
        f"<div><h3>before</h3>{svg(picture['before'])}</div>"
        f"<div><h3>after</h3>{svg(picture['after'])}</div></div>"
    )


def svg(drawing: dict, box_w: int = 118, box_h: int = 24, gap_x: int = 12, gap_y: int = 26) -> str:
    """A layered drawing: each node one level below its deepest producer."""
    nodes, edges = drawing["nodes"], drawing["edges"]
    level = [0] * len(nodes)
    for _ in nodes:  # longest path; the lists are small
        for source, target in edges:
            level[target] = max(level[target], level[source] + 1)
    rows = collections.defaultdict(list)
    for index, depth in enumerate(level):
        rows[depth].append(index)
    position = {}
    for depth, members in rows.items():
        for slot, index in enumerate(members):
            position[index] = (10 + slot * (box_w + gap_x), 10 + depth * (box_h + gap_y))
    width = 20 + max(len(m) for m in rows.values()) * (box_w + gap_x) if rows else 100
    height = 20 + (max(rows) + 1) * (box_h + gap_y) if rows else 60
    lines = [
        f"<line x1='{position[s][0] + box_w / 2}' y1='{position[s][1] + box_h}' "
        f"x2='{position[t][0] + box_w / 2}' y2='{position[t][1]}' stroke='#888'/>"
        for s, t in edges
    ]
    boxes = [
        f"<g><title>{_e(node['name'])}</title><rect x='{position[i][0]}' y='{position[i][1]}' "
        f"width='{box_w}' height='{box_h}' rx='4' fill='{_colour(node['op'])}' stroke='#555'/>"
        f"<text x='{position[i][0] + box_w / 2}' y='{position[i][1] + 16}' font-size='11' "
        f"text-anchor='middle'>{_e(node['op'][:18])}</text></g>"
        for i, node in enumerate(nodes)
    ]
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>" + "".join(lines + boxes) + "</svg>"
    )


def _colour(op: str) -> str:
    if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization"):
        return "#cfe8cf"
    if op in ("MatMul", "Softmax", "Concat"):
        return "#dde7f7"
    return "#f4f4f4"
