"""The quantization section of a report: what was quantized how, bytes, quality figures and
the KL divergence per position as an inline SVG chart (no network needed to view it).

Reads the `quantization` dict `kvfuse optimize --quantize` records (OUT.kvfuse.json and the
report's `quantization` key); one function per output format.
"""

from __future__ import annotations

import collections
import html


def summary_lines(quant: dict) -> list[str]:
    """A few plain lines for a terminal."""
    lines = [
        f"quantized {len(quant['nodes'])} ops ({_bits(quant)}), weights "
        f"{quant['fp32_bytes'] / 1e6:,.1f} MB → {quant['bytes'] / 1e6:,.1f} MB"
    ]
    if quant.get("exact"):
        steps = quant["exact"]["steps"]
        worst = max(s["max_abs_diff"] for s in steps)
        equal = all(s["token_original"] == s["token_rewritten"] for s in steps)
        lines.append(
            f"rewrite exact vs dequantized original: max |Δlogits| {worst:.2e}, tokens "
            f"{'equal' if equal else 'DIFFER'}"
        )
    for q in quant["quality"]:
        lines.append(f"quality at accuracy level {q['accuracy_level']}: {_quality_line(q)}")
    for fallback in quant["fallbacks"]:
        lines.append(f"fallback to round-to-nearest: {fallback['node']}: {fallback['reason']}")
    return lines


def _quality_line(q: dict) -> str:
    return (
        f"KLD mean {q['kld_mean']:.4g}, 99.9% {q['kld_p999']:.4g}; same top-1 "
        f"{100 * q['same_top1']:.1f}%; perplexity {q['perplexity_original']:.3f} → "
        f"{q['perplexity_quantized']:.3f} ({q['tokens']} tokens of {q['text']}); greedy "
        f"{q['greedy_equal']}/{q['greedy_steps']} equal"
    )


def _bits(quant: dict) -> str:
    counts = collections.Counter(
        f"{n['bits']}-bit/{n['block_size']} {n['source']}" for n in quant["nodes"]
    )
    return ", ".join(f"{count}× {kind}" for kind, count in counts.most_common())


def to_markdown(quant: dict | None) -> list[str]:
    """The section as Markdown lines (empty when nothing was quantized, or the dict holds only
    the card's summary figures)."""
    if not quant or "nodes" not in quant:
        return []
    lines = ["", "### Quantized weights", ""] + [f"- {line}" for line in summary_lines(quant)]
    for q in quant["quality"]:
        for m in q["mismatches"]:
            lines.append(
                f"- level {q['accuracy_level']} greedy mismatch at step {m['step']}: "
                f"{m['token_original']} vs {m['token_quantized']}, margin {m['margin']:.3f}"
            )
    lines += ["", "| node | op | bits | block | source | K × N | MB before → after |"]
    lines.append("|---|---|---|---|---|---|---|")
    for n in quant["nodes"]:
        lines.append(
            f"| `{n['node']}` | {n['op']} | {n['bits']} | {n['block_size']} | {n['source']} | "
            f"{n['k']} × {n['n']} | {n['fp32_bytes'] / 1e6:.2f} → {n['bytes'] / 1e6:.2f} |"
        )
    return lines


def to_html(quant: dict | None) -> str:
    """The section as HTML with its chart (empty when nothing was quantized, or the dict holds
    only the card's summary figures)."""
    if not quant or "nodes" not in quant:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(quant))
    charts = "".join(kld_chart(q) for q in quant["quality"])
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                n["node"],
                n["op"],
                n["bits"],
                n["block_size"],
                n["source"],
                f"{n['k']} × {n['n']}",
                f"{n['fp32_bytes'] / 1e6:.2f} → {n['bytes'] / 1e6:.2f}",
            )
        )
        + "</tr>"
        for n in quant["nodes"]
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("node", "op", "bits", "block", "source", "K × N", "MB")
    )
    return (
        f"<h2>Quantized weights</h2><ul>{items}</ul>{charts}"
        f"<table id='quantization'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


def kld_chart(q: dict, width: int = 640, height: int = 160) -> str:
    """KL divergence per position (binned means) as an inline SVG polyline."""
    values = q["kld_by_position"]
    top = max(max(values), 1e-12)
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - height * v / top:.1f}" for i, v in enumerate(values)
    )
    title = f"KLD per position, accuracy level {q['accuracy_level']} (max {top:.3g})"
    return (
        f"<figure><svg xmlns='http://www.w3.org/2000/svg' class='kld' width='{width}' "
        f"height='{height + 20}' viewBox='0 -10 {width} {height + 20}'>"
        f"<rect x='0' y='0' width='{width}' height='{height}' fill='none' stroke='#ccc'/>"
        f"<polyline fill='none' stroke='#c0392b' stroke-width='1.5' points='{points}'/></svg>"
        f"<figcaption>{html.escape(title)}: {q['tokens']} tokens of {html.escape(q['text'])} "
        f"in bins of {max(1, q['tokens'] // len(values))}</figcaption></figure>"
    )
