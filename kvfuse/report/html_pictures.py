"""The HTML report's pictures, each a section: op counts before and after, numerics per
verification step against the tolerance, the quantization's KLD per position (when the report
has a quantization section), and one layer's attention drawn before and after."""

from __future__ import annotations

from kvfuse.report import digest
from kvfuse.report.charts import bar_chart, layer_drawing, line_chart
from kvfuse.report.markup import esc as _e
from kvfuse.report.markup import table


def picture_sections(report: dict) -> list[str]:
    """The sections between the verdict card and the details, in reading order."""
    return [
        "<div class='row'>" + _ops_chart(report) + _numerics(report) + "</div>",
        _quantization(report),
        _picture(report),
    ]


def _ops_chart(report: dict) -> str:
    changes = digest.op_changes(report, limit=14)
    rows = [(r["op"], r["a"], r["b"]) for r in changes]
    left = len(digest.op_changes(report)) - len(changes)
    new = sum(1 for r in changes if r["a"] == 0)
    shown = (
        f"The largest changes first, with the {new} op types that are new"
        if new
        else ("The largest changes first")
    )
    more = f"; {left} smaller changes in the table below" if left > 0 else ""
    return (
        "<section id='ops'><h2>Op counts before and after</h2>"
        f"<p class='note'>{shown}{more}.</p>"
        + (bar_chart(rows, "ops-chart", width=560) if rows else "<p>No op count changed.</p>")
        + "<details><summary>every op type</summary>"
        + table(
            ["op", "before", "after", "Δ"],
            [[r["op"], r["a"], r["b"], f"{r['delta']:+d}"] for r in report["ops"]],
            "ops-table",
        )
        + "</details></section>"
    )


def _numerics(report: dict) -> str:
    numerics = report["numerics"]
    if numerics is None:
        return "<section id='numerics'><h2>Numerics</h2><p>Not verified.</p></section>"
    steps = numerics["steps"]
    verdict = "passed" if numerics["passed"] else "<span class='bad'>FAILED</span>"
    chart = line_chart(
        [s["step"].replace("decode ", "d") for s in steps],
        [s["tolerance_used"] for s in steps],
        "numerics-chart",
        limit=(1.0, "tolerance"),
        percent=True,
        y_label="share of tolerance used",
        width=540,
    )
    rows = [
        [
            s["step"],
            f"{s['max_abs_diff']:.2e}",
            f"{s['tolerance_used']:.2f}",
            s["token_original"],
            s["token_rewritten"],
        ]
        for s in steps
    ]
    return (
        "<section id='numerics'><h2>Numerics per verification step</h2>"
        f"<p>Verification {verdict}: the rewritten model against the original on the same "
        f"tokens, prefill of {numerics['prompt_tokens']} then greedy decode. Each point is the "
        "step's worst logit as a share of its tolerance |Δ| / (atol + rtol·|logit|); under 1 "
        f"passes. Max |Δlogits| {numerics['max_abs_diff']:.2e} (atol {numerics['atol']}, "
        f"rtol {numerics['rtol']}); greedy tokens "
        f"{'equal' if numerics['tokens_equal'] else '<b>differ</b>'}."
        + _recorded(numerics)
        + "</p>"
        + chart
        + "<details><summary>per-step figures</summary>"
        + table(
            ["step", "max |Δ|", "tolerance used", "token before", "token after"],
            rows,
            "numerics-table",
        )
        + "</details></section>"
    )


def _recorded(numerics: dict) -> str:
    if not numerics.get("recorded_in"):
        return ""
    return (
        f" Figures recorded by <code>kvfuse optimize</code> when it wrote the model, read from "
        f"<code>{_e(numerics['recorded_in'])}</code>."
    )


def _quantization(report: dict) -> str:
    quantization = report.get("quantization")
    if not quantization:
        return ""
    figures = digest.quantization_figures(quantization)
    parts = ["<section id='quantization'><h2>Quantization</h2>"]
    if quantization.get("bytes_before") and quantization.get("bytes_after"):
        parts.append(
            f"<p>Weights {digest.megabytes(quantization['bytes_before'])} → "
            f"{digest.megabytes(quantization['bytes_after'])} "
            f"({digest.percent_change(quantization['bytes_before'], quantization['bytes_after'])})."
            "</p>"
        )
    parts.append(table(["figure", "value"], figures, "quantization-table"))
    kld = quantization.get("kld") or []
    if kld:
        mean = quantization.get("mean_kld", sum(kld) / len(kld))
        gate = quantization.get("max_kld")
        parts.append(
            "<h3>KL divergence per position (quantized vs original)</h3>"
            + line_chart(
                [str(i) for i in range(len(kld))],
                list(kld),
                "kld-chart",
                limit=(gate, f"gate {gate:g}") if gate else None,
                mean=mean,
                y_label="KLD",
            )
        )
    nodes = quantization.get("nodes") or []
    if nodes:
        rows = [
            [n.get("node", ""), n.get("op", ""), n.get("bits", ""), n.get("block_size", "")]
            for n in nodes
        ]
        parts.append(
            f"<details><summary>{len(nodes)} quantized nodes</summary>"
            + table(["node", "op", "bits", "block size"], rows, "quantized-nodes")
            + "</details>"
        )
    return "".join(parts) + "</section>"


def _picture(report: dict) -> str:
    picture = report.get("picture")
    if not picture:
        return ""
    return (
        f"<section id='picture'><h2>Layer {_e(picture['layer'])} attention, before and after "
        f"({_e(picture['rule'])})</h2><div class='pictures'>"
        f"<div><h3>before: {len(picture['before']['nodes'])} nodes</h3>"
        f"{layer_drawing(picture['before'])}</div>"
        f"<div><h3>after: {len(picture['after']['nodes'])} nodes</h3>"
        f"{layer_drawing(picture['after'])}</div></div></section>"
    )
