"""The report as one self-contained HTML file (no network, no framework): a verdict card first
(what kvfuse did, whether it held, what it saved), then pictures (op counts, numerics per step,
KLD per position when quantized, one layer before and after), then the details with their
repetition folded into <details>. A few lines of script sort tables and open the section a
layer cell links to."""

from __future__ import annotations

from kvfuse.report import digest
from kvfuse.report import quantization as quant_section
from kvfuse.report.html_details import details_sections
from kvfuse.report.html_pictures import picture_sections
from kvfuse.report.markup import anchor
from kvfuse.report.markup import esc as _e

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;padding:12px 20px 40px;max-width:1180px;
 color:#222;background:#fafafa}
h2{margin:1.4em 0 .4em;font-size:18px}h3{margin:.2em 0;font-size:14px;color:#555}
table{border-collapse:collapse;margin:.5em 0;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f0f0f0;cursor:pointer;text-align:left}th:after{content:" ⇅";color:#aaa}
code{background:#f1f1f1;padding:0 3px;border-radius:3px}
.pictures{display:flex;gap:2em;flex-wrap:wrap}svg{background:#fff;border:1px solid #e2e2e2}
details{margin:.3em 0}summary{cursor:pointer;color:#245}.bad{color:#b00;font-weight:600}
#verdict{background:#fff;border:1px solid #d8d8d8;border-left:8px solid #2e7d32;
 border-radius:8px;padding:12px 18px 10px;box-shadow:0 1px 4px rgba(0,0,0,.06)}
#verdict.partial,#verdict.failed{border-left-color:#c62828}
#verdict.unverified,#verdict.diff{border-left-color:#b7791f}
.top{display:flex;justify-content:space-between;gap:1em;color:#666;font-size:12px}
.top span{white-space:nowrap}.top .paths{overflow:hidden;text-overflow:ellipsis}
.headline{font-size:21px;font-weight:600;margin:4px 0 8px;line-height:1.3}
.headline .mark{color:#2e7d32}.partial .headline .mark,.failed .headline .mark{color:#c62828}
.cells{display:flex;flex-wrap:wrap;gap:3px;margin:4px 0 2px}
.cell{display:inline-block;min-width:24px;height:22px;line-height:22px;text-align:center;
 font-size:11px;border-radius:3px;color:#fff;text-decoration:none;background:#2e7d32}
.cell.miss{background:#c62828}.legend{font-size:12px;color:#555;margin-bottom:6px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px;
 margin:8px 0 4px}.tile.wide{grid-column:span 2}
@media (min-width:1000px){.tiles{grid-template-columns:repeat(8,1fr)}}
.tile{border:1px solid #e6e6e6;border-radius:6px;padding:6px 10px;background:#fcfcfc}
.tile .k{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#777}
.tile .v{font-size:17px;font-weight:600;white-space:nowrap}.tile .s{font-size:12px;color:#555}
.tile.t-good .v{color:#2e7d32}.tile.t-bad .v{color:#c62828}
.blockers{margin:8px 0 2px;padding:6px 10px;background:#fff4f4;border:1px solid #f1c6c6;
 border-radius:6px}.blockers li{margin:2px 0}
nav{margin:10px 0 0;font-size:13px}nav a{margin-right:14px;color:#245}
.note{color:#555;font-size:13px}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}.row>section{flex:1 1 540px}
"""

SCRIPT = """
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
function openTarget() {
  var target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  for (var node = target; node; node = node.parentElement) {
    if (node.tagName === 'DETAILS') { node.open = true; }
  }
}
window.addEventListener('hashchange', openTarget);
if (location.hash) { openTarget(); }
"""

LOWERING_COLOURS = ["#2e7d32", "#00838f", "#6a1b9a", "#ad6800", "#1565c0", "#5d4037"]


def to_html(report: dict) -> str:
    """The whole page: the verdict card, the pictures, then the details."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>kvfuse report: {_e(_model_name(report))}</title>",
        f"<style>{STYLE}</style></head><body>",
        verdict_card(report),
        _contents(report),
        *picture_sections(report),
        *details_sections(report),
        quant_section.to_html(report.get("quantization")),
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _model_name(report: dict) -> str:
    path = report["models"]["b"]["path"]
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _path(path: str) -> str:
    """The file and its folder, with the whole path on hover."""
    short = "/".join(path.replace("\\", "/").split("/")[-2:])
    return f"<code title='{_e(path)}'>{_e(short)}</code>"


def verdict_card(report: dict) -> str:
    """The header card: the verdict in one sentence, the layers as cells, the figures."""
    state = digest.status(report)
    meta = report.get("meta") or {}
    created = (meta.get("created") or "").replace("T", " ").replace("+00:00", " UTC")
    mark = "✓" if state == "ok" else "✗" if state in ("partial", "failed") else "•"
    return (
        f"<header id='verdict' class='{state}'><div class='top'>"
        f"<span class='paths'>kvfuse report · {_path(report['models']['a']['path'])} → "
        f"{_path(report['models']['b']['path'])}</span>"
        f"<span>kvfuse {_e(meta.get('kvfuse_version', '?'))} · {_e(created)}</span></div>"
        f"<div class='headline'><span class='mark'>{mark}</span> "
        f"{_e(digest.headline(report))}</div>"
        + _cells(report)
        + "<div class='tiles'>"
        + "".join(_tiles(report))
        + "</div>"
        + _blockers(report)
        + "</header>"
    )


def _cells(report: dict) -> str:
    cells = digest.layer_cells(report)
    if not cells:
        return ""
    lowerings = list(dict.fromkeys(c["lowering"] for c in cells if c["fused"] and c["lowering"]))
    colour = {name: LOWERING_COLOURS[i % len(LOWERING_COLOURS)] for i, name in enumerate(lowerings)}
    links = []
    for cell in cells:
        if cell["fused"]:
            how = f"fused ({cell['lowering']})" if cell["lowering"] else "fused"
            if cell["lowering_reason"]:
                how += f": {cell['lowering_reason']}"
            style = f" style='background:{colour[cell['lowering']]}'" if cell["lowering"] else ""
            css = "cell"
        else:
            how, style, css = f"NOT fused: {cell['reason']}", "", "cell miss"
        links.append(
            f"<a class='{css}' href='#{anchor(cell['layer'])}'{style} "
            f"title='layer {_e(cell['layer'])}: {_e(how)}'>{_e(cell['layer'])}</a>"
        )
    legend = list(colour.items())
    if any(c["fused"] and not c["lowering"] for c in cells):
        legend.insert(0, ("fused", LOWERING_COLOURS[0]))
    if any(not c["fused"] for c in cells):
        legend.append(("not fused", "#c62828"))
    keys = "".join(f"<i style='background:{c}'></i>{_e(name)}" for name, c in legend)
    return (
        f"<div class='cells' id='layer-cells'>{''.join(links)}</div>"
        f"<div class='legend'>attention layers (click one for its section):{keys}</div>"
    )


def _tile(key: str, value: str, sub: str = "", css: str = "") -> str:
    css = " ".join(f"t-{c}" if c in ("good", "bad") else c for c in css.split())
    return (
        f"<div class='tile {css}'><div class='k'>{_e(key)}</div><div class='v'>{value}</div>"
        f"<div class='s'>{sub}</div></div>"
    )


def _tiles(report: dict) -> list[str]:
    tiles = [_layers_tile(report)] if digest.layers(report) else []
    if (report.get("meta") or {}).get("written") is False:
        unwritten = _tile(
            "output",
            "not written",
            "kvfuse writes a model only when every layer fuses and verification passes",
            "bad wide",
        )
        return tiles + [unwritten, _target_tile(report), _quantization_tile(report)]
    a, b = report["models"]["a"], report["models"]["b"]
    changed = sum(1 for r in report["ops"] if r["delta"])
    tiles.append(
        _tile(
            "nodes",
            f"{a['nodes']:,} → {b['nodes']:,}",
            f"{digest.percent_change(a['nodes'], b['nodes'])} · {changed} op types changed",
        )
    )
    tiles.append(
        _tile(
            "bytes on disk",
            digest.size_pair(a["file_bytes"], b["file_bytes"]),
            "weights " + digest.size_pair(a["initializer_bytes"], b["initializer_bytes"]),
        )
    )
    tiles.append(_verification_tile(report))
    kv = (report.get("meta") or {}).get("kv")
    if kv:
        tiles.append(_kv_tile(kv))
    return tiles + [_target_tile(report), _quantization_tile(report)]


def _layers_tile(report: dict) -> str:
    layers = digest.layers(report)
    fused = sum(layer["fused"] for layer in layers)
    sub = (
        f"{len(layers) - fused} not fused"
        if fused < len(layers)
        else digest.lowering_summary(report) or "attention, one fused op each"
    )
    return _tile(
        "layers fused", f"{fused}/{len(layers)}", _e(sub), "good" if fused == len(layers) else "bad"
    )


def _kv_tile(kv: dict) -> str:
    return _tile(
        "KV memory",
        digest.mib(kv["bytes_per_row"]),
        ("" if kv["batch_size"] else "per batch row · ")
        + f"{kv['buffers']} × [{kv['batch_size'] or 'batch'}, {kv['kv_heads']}, "
        f"{kv['max_context']}, {kv['head_dim']}] {_e(kv['dtype'])}, in place",
    )


def _verification_tile(report: dict) -> str:
    numerics = report["numerics"]
    if numerics is None:
        return _tile("verification", "not verified", "no numerical check in this report", "bad")
    worst = max((s["tolerance_used"] for s in numerics["steps"]), default=0.0)
    tokens = "greedy tokens equal" if numerics["tokens_equal"] else "greedy tokens DIFFER"
    return _tile(
        "verification " + ("passed" if numerics["passed"] else "FAILED"),
        f"{'✓' if numerics['passed'] else '✗'} max |Δlogits| {numerics['max_abs_diff']:.1e}",
        f"{tokens} · tolerance {numerics['atol']:g} + {numerics['rtol']:g}·|logit|, worst step "
        f"at {digest.share(worst)} of it · prefill of {numerics['prompt_tokens']} + "
        f"{len(numerics['steps']) - 1} decode steps"
        + (" (recorded at optimize time)" if numerics.get("recorded_in") else ""),
        "good wide" if numerics["passed"] else "bad wide",
    )


def _target_tile(report: dict) -> str:
    meta = report.get("meta") or {}
    opsets = ", ".join(f"{d} {v}" for d, v in report["models"]["b"]["opsets"].items())
    return _tile("target", _e(meta.get("target") or "—"), f"opsets {_e(opsets)}")


def _quantization_tile(report: dict) -> str:
    quantization = report.get("quantization")
    if not quantization:
        return _tile("quantization", "none", "weights kept as exported")
    figures = dict(digest.quantization_figures(quantization))
    value = figures.get("scheme") or (
        f"int{figures['weight bits']}" if "weight bits" in figures else "quantized"
    )
    quality = [f"{k} {figures[k]}" for k in ("mean KLD", "same top-1") if k in figures]
    passed = quantization.get("passed")
    return _tile(
        "quantization",
        _e(value),
        _e(" · ".join(quality) or "no quality figures"),
        "bad" if passed is False else "",
    )


def _blockers(report: dict) -> str:
    groups = digest.blockers(report)
    if not groups:
        return ""
    items = []
    for group in groups:
        culprits = ", ".join(f"<code>{_e(c)}</code>" for c in group["culprits"][:4])
        closest = (
            f" Closest rule: <b>{_e(group['closest_rule'])}</b> ({group['closest_matched']} "
            f"nodes matched; stopped at: {_e(group['closest_reason'].rstrip('.'))})."
            if group["closest_rule"]
            else ""
        )
        items.append(
            f"<li><a href='#{anchor(group['layers'][0])}'>"
            f"{_e(digest.layer_list(group['layers']))}</a>: {_e(group['reason'].rstrip('.'))}."
            + (f" Culprits: {culprits}." if culprits else "")
            + closest
            + "</li>"
        )
    return f"<div class='blockers' id='near-misses'><b>Why not:</b><ul>{''.join(items)}</ul></div>"


def _contents(report: dict) -> str:
    links = [("ops", "op counts"), ("numerics", "numerics")]
    if report.get("quantization"):
        links.append(("quantization", "quantization"))
    if report.get("picture"):
        links.append(("picture", "one layer before/after"))
    links += [("io", "inputs & outputs"), ("rewrites", "rewrites"), ("layers", "layers")]
    links.append(("models", "models"))
    return "<nav>" + "".join(f"<a href='#{i}'>{_e(t)}</a>" for i, t in links) + "</nav>"
