"""OUT_ROOT/index.json (for tools) and OUT_ROOT/index.html (one self-contained page for people):
one row per model, in the order of the models file, each linking to its own report."""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path

from kvfuse import __version__
from kvfuse.files import staged_file

COLUMNS = (
    "model",
    "status",
    "layers fused",
    "nodes",
    "bytes",
    "verification",
    "prefill (ms)",
    "decode (tok/s)",
    "report",
)


def write_index(out_root: Path, rows: list[dict], models_file: Path) -> list[Path]:
    """Write index.json and index.html under `out_root` (each atomically).

    Args:
        out_root: the run's output directory.
        rows: the jobs' rows, in the models file's order.
        models_file: the models file the run read (recorded in the index).

    Returns:
        The two paths written.
    """
    document = {
        "kvfuse_version": __version__,
        "models_file": str(models_file),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "models": rows,
    }
    written = []
    for name, text in (
        ("index.json", json.dumps(document, indent=2) + "\n"),
        ("index.html", _html(document)),
    ):
        path = Path(out_root) / name
        with staged_file(path, overwrite=True) as staging:
            (staging / name).write_text(text)
        written.append(path)
    return written


def cells(row: dict) -> list[str]:
    """One row's cells as plain text, in COLUMNS order (shared by the HTML and the terminal)."""
    if row.get("status") != "ok":
        reason = row.get("reason", "not run")
        return [row["name"], row.get("status", "pending"), reason, "", "", "", "", "", ""]
    verification = row.get("verification")
    if verification is None:
        checked = "skipped"
    else:
        verdict = "passed" if verification["passed"] else "FAILED"
        checked = f"{verdict}, max |Δ| {verification['max_abs_diff']:.1e}"
    bench = row.get("benchmark") or {}
    status = "ok (reused)" if row.get("reused") else "ok"
    return [
        row["name"],
        status,
        f"{row['layers_fused']}/{row['layers']}",
        f"{row['nodes_before']:,} → {row['nodes_after']:,}",
        f"{row['bytes'] / 1e6:,.1f} MB",
        checked,
        f"{bench['prefill_ms']:.1f}" if bench else "",
        f"{bench['decode_tokens_per_s']:.1f}" if bench else "",
        "report.html",
    ]


def _html(document: dict) -> str:
    body = []
    for row in document["models"]:
        values = [html.escape(c) for c in cells(row)]
        name = html.escape(row["name"])
        if row.get("status") == "ok":
            values[-1] = (
                f'<a href="{name}/report.html">report</a> · '
                f'<a href="{name}/{html.escape(row["model"])}">model</a>'
            )
        else:
            values[2] = f'<span class="reason">{values[2]}</span>'
            values[-1] = f'<a href="{name}/job.log">log</a>' if row.get("status") else ""
        klass = "ok" if row.get("status") == "ok" else "failed"
        body.append(f'<tr class="{klass}">' + "".join(f"<td>{v}</td>" for v in values) + "</tr>")
    header = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    ok = sum(row.get("status") == "ok" for row in document["models"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvfuse optimize-many</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
tr.failed td:nth-child(2) {{ color: #b00; font-weight: bold; }}
tr.ok td:nth-child(2) {{ color: #070; }}
.reason {{ color: #600; }}
</style></head><body>
<h1>kvfuse optimize-many</h1>
<p>{ok} of {len(document["models"])} models optimized · models file
<code>{html.escape(document["models_file"])}</code>
· kvfuse {html.escape(document["kvfuse_version"])} · written {html.escape(document["written"])}</p>
<table><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""
