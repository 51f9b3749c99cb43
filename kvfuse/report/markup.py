"""HTML building blocks shared by the report's page modules: escaping, tables, anchors."""

from __future__ import annotations

import html
import re


def esc(text) -> str:
    """`text` escaped for HTML."""
    return html.escape(str(text))


def anchor(layer: str) -> str:
    """The element id of a layer's section."""
    return "layer-" + re.sub(r"[^A-Za-z0-9_-]", "-", layer)


def table(header, rows, table_id: str, raw: bool = False) -> str:
    """A sortable table; cells are escaped unless `raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell if raw else esc(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return (
        f"<table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )
