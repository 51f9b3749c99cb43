"""The report as Markdown: for a terminal (rendered with colour by rich) or a PR comment."""

from __future__ import annotations

import collections


def to_markdown(report: dict) -> str:
    a, b = report["models"]["a"], report["models"]["b"]
    lines = [
        "# kvfuse graph diff",
        "",
        f"`{a['path']}` → `{b['path']}`",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| nodes | {a['nodes']:,} | {b['nodes']:,} |",
        f"| initializers | {a['initializers']:,} ({a['initializer_bytes'] / 1e6:,.1f} MB) | "
        f"{b['initializers']:,} ({b['initializer_bytes'] / 1e6:,.1f} MB) |",
        f"| file size | {a['file_bytes'] / 1e6:,.1f} MB | {b['file_bytes'] / 1e6:,.1f} MB |",
        f"| opsets | {_opsets(a)} | {_opsets(b)} |",
        "",
        "## Ops",
        "",
        "| op | before | after | Δ |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['op']} | {r['a']} | {r['b']} | {r['delta']:+d} |"
        for r in report["ops"]
        if r["delta"] != 0
    ][:30]
    lines += [
        "",
        "## Inputs and outputs",
        "",
        "| | name | change | before | after |",
        "|---|---|---|---|---|",
    ]
    for kind in ("inputs", "outputs"):
        for row in report["io"][kind]:
            if row["change"] != "same":
                lines.append(
                    f"| {kind[:-1]} | `{row['name']}` | {row['change']} | "
                    f"{row['a'] or ''} | {row['b'] or ''} |"
                )
    if report["io"]["aliases"]:
        lines += [
            "",
            f"{len(report['io']['aliases'])} outputs share their buffer with an "
            "input (retained-state KV), e.g. "
            f"`{report['io']['aliases'][0]['output']}` ≡ "
            f"`{report['io']['aliases'][0]['input']}`.",
        ]
    lines += _rewrites(report) + _layers(report) + _numerics(report)
    structural = report["structural"]
    lines += [
        "",
        "## Structural diff",
        "",
        f"{structural['removed']:,} nodes removed, {structural['added']:,} added, "
        f"{structural['kept']:,} kept (by name).",
    ]
    return "\n".join(lines) + "\n"


def _opsets(model: dict) -> str:
    return ", ".join(f"{d} {v}" for d, v in model["opsets"].items())


def _rewrites(report: dict) -> list[str]:
    if not report["rewrites"]:
        return []
    lines = [
        "",
        "## Rewrites",
        "",
        "| rule | nodes created | input nodes replaced |",
        "|---|---|---|",
    ]
    replaced = collections.Counter()
    for rewrite in report["rewrites"]:
        replaced[rewrite["rule"]] += len(rewrite["replaced"])
    for rule, count in report["rewrites_by_rule"].items():
        lines.append(f"| {rule} | {count} | {replaced[rule]} |")
    first = next((r for r in report["rewrites"] if r["op_type"] == "GroupQueryAttention"), None)
    if first:
        ops = collections.Counter(r["op_type"] for r in first["replaced"])
        listed = ", ".join(f"{op} ×{n}" for op, n in ops.most_common())
        lines += [
            "",
            f"Layer {first['layer']}: `{first['node']}` ({first['rule']}) replaced "
            f"{len(first['replaced'])} nodes: {listed}.",
        ]
    return lines


def _layers(report: dict) -> list[str]:
    if not report["layers"]:
        return []
    fused = sum(layer["fused"] for layer in report["layers"])
    lines = ["", "## Attention layers", "", f"{fused} of {len(report['layers'])} fused."]
    for miss in report["near_misses"]:
        lines.append(f"- layer {miss['layer']}: **{miss['rule']}** — {miss['reason']}")
    for layer in report["layers"]:
        if layer.get("lowering"):
            lines.append(
                f"- layer {layer['layer']} lowered as **{layer['lowering']}** — "
                f"{layer['lowering_reason']}"
            )
    return lines


def _numerics(report: dict) -> list[str]:
    numerics = report["numerics"]
    if numerics is None:
        return ["", "## Numerics", "", "Not verified."]
    verdict = "passed" if numerics["passed"] else "**FAILED**"
    lines = [
        "",
        "## Numerics",
        "",
        f"Verification {verdict}: max |Δlogits| {numerics['max_abs_diff']:.2e} (atol "
        f"{numerics['atol']}, rtol {numerics['rtol']}), greedy tokens "
        f"{'equal' if numerics['tokens_equal'] else 'differ'}.",
        "",
        "| step | max abs Δ | tolerance used | token before | token after |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['step']} | {s['max_abs_diff']:.2e} | {s['tolerance_used']:.2f} | "
        f"{s['token_original']} | {s['token_rewritten']} |"
        for s in numerics["steps"]
    ]
    return lines
