"""Inline SVG pictures for the HTML report, drawn here with no library and no script: a paired
bar chart (the op histogram before and after), a line chart against a limit (numerics per
verification step, KLD per position), and a layered drawing of one layer's subgraph.

Every mark that stands for a number carries it as `data-value`, so a test (or a reader's
devtools) can check the picture against the report's figures.
"""

from __future__ import annotations

import collections
import html
import math

INK, MUTED, GRID = "#222", "#666", "#e3e3e3"
BEFORE, AFTER, LIMIT = "#b9bec6", "#2f6fb3", "#c62828"


def _e(text) -> str:
    return html.escape(str(text))


def _svg(chart_id: str, width: float, height: float, body: list[str], label: str) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' id='{chart_id}' role='img' "
        f"aria-label='{_e(label)}' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}' font-family='system-ui,sans-serif'>"
        + "".join(body)
        + "</svg>"
    )


def bar_chart(rows: list[tuple[str, int, int]], chart_id: str, width: int = 640) -> str:
    """Paired horizontal bars, one pair per row: before (grey) and after (blue), with the
    counts and the change written beside them.

    Args:
        rows: (label, before, after) in the order to draw them.
        chart_id: the svg element's id.
        width: pixels.

    Returns:
        An `<svg>` element as text.
    """
    label_w, value_w, row_h = 196, 136, 28
    bar_w = width - label_w - value_w
    top = max((max(b, a) for _, b, a in rows), default=1) or 1
    body = [_legend(label_w, 12, [("before", BEFORE), ("after", AFTER)])]
    for index, (label, before, after) in enumerate(rows):
        y = 24 + index * row_h
        body.append(
            f"<text x='{label_w - 8}' y='{y + 15}' font-size='11' text-anchor='end' "
            f"fill='{INK}'>{_e(label if len(label) <= 30 else label[:29] + '…')}</text>"
        )
        for offset, count, colour in ((2, before, BEFORE), (13, after, AFTER)):
            length = max(bar_w * count / top, 1 if count else 0)
            body.append(
                f"<rect x='{label_w}' y='{y + offset}' width='{length:.1f}' height='10' "
                f"fill='{colour}' data-value='{count}'><title>{_e(label)}: {count:,}</title></rect>"
            )
        delta = after - before
        colour = "#2e7d32" if delta < 0 else AFTER if delta > 0 else MUTED
        signed = f"{delta:+,}".replace("-", "−")
        body.append(
            f"<text x='{label_w + bar_w + 8}' y='{y + 15}' font-size='12' fill='{MUTED}'>"
            f"{before:,} → {after:,} <tspan fill='{colour}' font-weight='600'>({signed})"
            "</tspan></text>"
        )
    height = 30 + len(rows) * row_h
    return _svg(chart_id, width, height, body, "op counts before and after")


def _legend(x: float, y: float, entries: list[tuple[str, str]]) -> str:
    parts = []
    for label, colour in entries:
        parts.append(
            f"<rect x='{x}' y='{y - 9}' width='10' height='10' fill='{colour}'/>"
            f"<text x='{x + 14}' y='{y}' font-size='11' fill='{MUTED}'>{_e(label)}</text>"
        )
        x += 22 + 7 * len(label)
    return "".join(parts)


def line_chart(
    labels: list[str],
    values: list[float],
    chart_id: str,
    *,
    limit: tuple[float, str] | None = None,
    mean: float | None = None,
    log: bool = True,
    percent: bool = False,
    y_label: str = "",
    width: int = 640,
    height: int = 220,
) -> str:
    """One series of points against an optional limit line (dashed red) and mean (dotted).

    Args:
        labels: one x label per value (drawn all when few, else every k-th).
        values: the y values (≥ 0; zeros sit on the axis of a log chart).
        chart_id: the svg element's id.
        limit: (value, label) of the line the values must stay under.
        mean: a dotted line at this value.
        log: logarithmic y axis (values spanning decades, as errors do).
        percent: label the y axis in per cent (values are fractions).
        y_label: the axis title.
        width, height: pixels.

    Returns:
        An `<svg>` element as text.
    """
    left, right, top, bottom = 62, 16, 22, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    extent = values + [limit[0]] if limit else list(values)
    scale = _log_scale(extent) if log else _linear_scale(extent)
    y_of = lambda v: top + plot_h * (1 - scale(v))  # noqa: E731
    step = plot_w / max(len(values) - 1, 1)
    x_of = lambda i: left + i * step  # noqa: E731
    body = _y_grid(scale, log, percent, left, plot_w, y_of)
    body.append(
        f"<text x='12' y='{top + plot_h / 2}' font-size='11' fill='{MUTED}' text-anchor='middle' "
        f"transform='rotate(-90 12 {top + plot_h / 2})'>{_e(y_label)}</text>"
    )
    body += _x_labels(labels, x_of, height - bottom + 16)
    if limit is not None:
        body.append(_rule(limit[0], limit[1], LIMIT, "6 4", left, plot_w, y_of))
    if mean is not None:
        body.append(_rule(mean, f"mean {mean:.3g}", MUTED, "2 3", left, plot_w, y_of))
    points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(values))
    body.append(f"<polyline points='{points}' fill='none' stroke='{AFTER}' stroke-width='2'/>")
    radius = 3.5 if len(values) <= 60 else 1.2
    body += [
        f"<circle cx='{x_of(i):.1f}' cy='{y_of(v):.1f}' r='{radius}' fill='{AFTER}' "
        f"data-value='{v:.6g}'><title>{_e(labels[i])}: {v:.3g}</title></circle>"
        for i, v in enumerate(values)
    ]
    return _svg(chart_id, width, height, body, y_label)


def _x_labels(labels: list[str], x_of, y: float) -> list[str]:
    """All x labels when there are few, else about ten of them and the last."""
    every = max(1, math.ceil(len(labels) / 10))
    return [
        f"<text x='{x_of(index):.1f}' y='{y}' font-size='11' fill='{MUTED}' "
        f"text-anchor='middle'>{_e(label)}</text>"
        for index, label in enumerate(labels)
        if index % every == 0 or index == len(labels) - 1
    ]


def _rule(value, text, colour, dash, left, plot_w, y_of) -> str:
    """A horizontal line across the plot at `value`, labelled at its right end."""
    y = y_of(value)
    return (
        f"<line x1='{left}' x2='{left + plot_w}' y1='{y:.1f}' y2='{y:.1f}' stroke='{colour}' "
        f"stroke-dasharray='{dash}'/><text x='{left + plot_w - 4}' y='{y - 4:.1f}' "
        f"font-size='11' text-anchor='end' fill='{colour}'>{_e(text)}</text>"
    )


def _log_scale(values: list[float]):
    positive = [v for v in values if v > 0] or [1.0]
    low = math.floor(math.log10(min(positive)))
    high = max(math.ceil(math.log10(max(positive))), low + 1)

    def scale(value: float) -> float:
        return 0.0 if value <= 0 else (math.log10(value) - low) / (high - low)

    scale.ticks = [10.0**k for k in range(low, high + 1)]
    return scale


def _linear_scale(values: list[float]):
    high = max(values, default=1.0) or 1.0
    magnitude = 10 ** math.floor(math.log10(high))
    high = math.ceil(high / magnitude) * magnitude

    def scale(value: float) -> float:
        return value / high

    scale.ticks = [high * k / 4 for k in range(5)]
    return scale


def _y_grid(scale, log: bool, percent: bool, left: float, plot_w: float, y_of) -> list[str]:
    lines = []
    for tick in scale.ticks:
        y = y_of(tick)
        if percent:
            text = f"{tick:.0%}" if tick >= 0.01 else f"{tick * 100:g}%"
        else:
            text = f"1e{round(math.log10(tick))}" if log else f"{tick:.3g}"
        lines.append(
            f"<line x1='{left}' x2='{left + plot_w}' y1='{y:.1f}' y2='{y:.1f}' stroke='{GRID}'/>"
            f"<text x='{left - 6}' y='{y + 4:.1f}' font-size='11' text-anchor='end' "
            f"fill='{MUTED}'>{text}</text>"
        )
    return lines


def layer_drawing(
    drawing: dict, box_w: int = 112, box_h: int = 20, gap_x: int = 10, gap_y: int = 16
) -> str:
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
        f"<text x='{position[i][0] + box_w / 2}' y='{position[i][1] + 14}' font-size='10' "
        f"text-anchor='middle'>{_e(node['op'][:18])}</text></g>"
        for i, node in enumerate(nodes)
    ]
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' class='drawing' width='{width}' "
        f"height='{height}' viewBox='0 0 {width} {height}'>" + "".join(lines + boxes) + "</svg>"
    )


def _colour(op: str) -> str:
    if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "Attention"):
        return "#cfe8cf"
    if op in ("MatMul", "Softmax", "Concat"):
        return "#dde7f7"
    return "#f4f4f4"
