"""The HTML report's detail sections, each folded: inputs and outputs one row per kind, rewrites
one row per rule, one collapsible section per layer, the models' figures side by side. The full
lists stay one click away in <details>."""

from __future__ import annotations

import collections
import json

from kvfuse.report import digest
from kvfuse.report.markup import anchor, table
from kvfuse.report.markup import esc as _e


def details_sections(report: dict) -> list[str]:
    """The sections below the pictures, in reading order."""
    return [_io(report), _rewrites(report), _layers(report), _models(report)]


def _io(report: dict) -> str:
    rows = []
    for group in digest.fold_io(report):
        notes = []
        if group["became_static"]:
            notes.append("axis " + ", ".join(map(str, group["became_static"])) + " became fixed")
        if group["in_place"]:
            notes.append(f"same buffer as <code>{_e(group['aliases_of'])}</code>: bound in place")
        rows.append(
            [
                _e(group["label"]),
                f"<code>{_e(group['pattern'])}</code>",
                _e(group["change"]),
                _e(digest.dims(group["a"])),
                _e(digest.dims(group["b"])),
                "; ".join(notes),
            ]
        )
    full = [
        [
            kind[:-1],
            f"<code>{_e(r['name'])}</code>",
            r["change"],
            _e(digest.dims(r["a"])),
            _e(digest.dims(r["b"])),
            ", ".join(map(str, r["became_static"])),
        ]
        for kind in ("inputs", "outputs")
        for r in report["io"][kind]
    ]
    return (
        "<section id='io'><h2>Inputs and outputs</h2>"
        + table(["what", "names", "change", "before", "after", "note"], rows, "io-folded", raw=True)
        + f"<details id='io-all'><summary>all {len(full)} inputs and outputs, one by one"
        "</summary>"
        + table(
            ["kind", "name", "change", "before", "after", "became static (axes)"],
            full,
            "io-full",
            raw=True,
        )
        + "</details></section>"
    )


def _rewrites(report: dict) -> str:
    if not report["rewrites"]:
        structural = report["structural"]
        return (
            "<section id='rewrites'><h2>Rewrites</h2><p>No node of the second model was written "
            f"by a kvfuse rule. By name: {structural['removed']:,} nodes removed, "
            f"{structural['added']:,} added, {structural['kept']:,} kept.</p>"
            + (
                table(["op", "removed"], list(structural["removed_by_op"].items()), "removed")
                if structural["removed_by_op"]
                else ""
            )
            + "</section>"
        )
    rows, lists = [], []
    for row in digest.fold_rewrites(report):
        ops = ", ".join(f"{op} ×{n}" for op, n in row["replaced_ops"].most_common(4))
        created = ", ".join(f"{op} ×{n}" for op, n in row["op_types"].most_common())
        where = digest.layer_list(row["layers"]) if row["layers"] else "whole graph"
        rows.append(
            [row["rule"], created, where.replace(" ", "\u00a0"), f"{row['replaced']:,}", ops]
        )
        lists.append(
            f"<details><summary>{_e(row['rule'])}: the "
            + (f"{row['created']} nodes" if row["created"] > 1 else "node")
            + " it created"
            "</summary><ul>"
            + "".join(_rewrite_item(item) for item in row["items"])
            + "</ul></details>"
        )
    return (
        "<section id='rewrites'><h2>Rewrites, one row per rule</h2>"
        + table(["rule", "created", "where", "input nodes replaced", "mostly"], rows, "rules")
        + "".join(lists)
        + "</section>"
    )


def _rewrite_item(rewrite: dict) -> str:
    layer = f"layer {_e(rewrite['layer'])}: " if rewrite["layer"] is not None else ""
    names = ", ".join(
        f"{_e(x['op_type'])} <code>{_e(x['name'])}</code>" for x in rewrite["replaced"]
    )
    return (
        f"<li>{layer}<code>{_e(rewrite['op_type'])}</code> <code>{_e(rewrite['node'])}</code> "
        f"replaced {len(rewrite['replaced'])}"
        + (f"<details><summary>which</summary>{names}</details>" if names else "")
        + "</li>"
    )


def _layers(report: dict) -> str:
    if not digest.layers(report):
        return ""
    by_layer = collections.defaultdict(list)
    for rewrite in report["rewrites"]:
        by_layer[rewrite["layer"]].append(rewrite)
    misses = collections.defaultdict(list)
    for miss in report["near_misses"]:
        misses[miss["layer"]].append(miss)
    sections = [
        _layer_section(cell, by_layer[cell["layer"]], misses[cell["layer"]])
        for cell in digest.layer_cells(report)
    ]
    found = digest.layers(report)
    fused = sum(layer["fused"] for layer in found)
    lowered = [
        [digest.layer_list(g["layers"]), g["lowering"], g["reason"]]
        for g in digest.lowering_groups(report)
    ]
    return (
        f"<section id='layers'><h2>Attention layers: {fused} of {len(found)} fused</h2>"
        + (table(["layers", "lowering", "why"], lowered, "lowerings") if lowered else "")
        + "".join(sections)
        + "</section>"
    )


def _layer_section(cell: dict, rewrites: list[dict], misses: list[dict]) -> str:
    if cell["fused"]:
        how = " — fused" + (f", lowered as {_e(cell['lowering'])}" if cell["lowering"] else "")
        created = collections.Counter(r["op_type"] for r in rewrites).most_common()
        created.sort(key=lambda item: "Attention" not in item[0])  # the attention op first
        if created:
            how += ": " + ", ".join(f"{_e(op)} ×{n}" for op, n in created)
    else:
        how = f" — <span class='bad'>not fused</span>: {_e(cell['reason'])}"
    body = []
    if cell["lowering_reason"]:
        body.append(f"<p>Lowering {_e(cell['lowering'])}: {_e(cell['lowering_reason'])}.</p>")
    if rewrites:
        body.append("<ul>" + "".join(_rewrite_item(r) for r in rewrites) + "</ul>")
    if misses:
        rows = [
            [m["rule"], m["matched_nodes"], m["reason"], ", ".join(m["culprits"])] for m in misses
        ]
        body.append(
            table(
                ["rule tried", "nodes matched", "why not", "culprits"],
                rows,
                f"{anchor(cell['layer'])}-misses",
            )
        )
    return (
        f"<details id='{anchor(cell['layer'])}'"
        + (" open" if not cell["fused"] else "")
        + f"><summary>layer {_e(cell['layer'])}{how}</summary>"
        + ("".join(body) or "<p>No rewrite recorded in this layer.</p>")
        + "</details>"
    )


def _models(report: dict) -> str:
    a, b = report["models"]["a"], report["models"]["b"]
    rows = [
        ["path", f"<code>{_e(a['path'])}</code>", f"<code>{_e(b['path'])}</code>"],
        ["nodes", f"{a['nodes']:,}", f"{b['nodes']:,}"],
        ["initializers", f"{a['initializers']:,}", f"{b['initializers']:,}"],
        [
            "initializer MB",
            digest.megabytes(a["initializer_bytes"]),
            digest.megabytes(b["initializer_bytes"]),
        ],
        ["file MB", digest.megabytes(a["file_bytes"]), digest.megabytes(b["file_bytes"])],
        ["opsets", _e(json.dumps(a["opsets"])), _e(json.dumps(b["opsets"]))],
    ]
    structural = report["structural"]
    aliases = report["io"]["aliases"]
    shared = (
        f"<p>{len(aliases)} outputs are the same buffer as an input (retained-state KV, "
        f"updated in place), e.g. <code>{_e(aliases[0]['output'])}</code> ≡ "
        f"<code>{_e(aliases[0]['input'])}</code>.</p>"
        if aliases
        else ""
    )
    return (
        "<section id='models'><h2>The two models</h2>"
        + table(["", "before", "after"], rows, "summary", raw=True)
        + shared
        + f"<p>By node name: {structural['removed']:,} removed, {structural['added']:,} added, "
        f"{structural['kept']:,} kept.</p></section>"
    )
