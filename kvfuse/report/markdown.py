"""The report as Markdown (for a terminal, rendered by rich, or a PR comment), in the HTML
page's order: the verdict and its figures first, then why layers did not fuse, then the
details with their repetition folded."""

from __future__ import annotations

from kvfuse.report import digest
from kvfuse.report import quantization as quant_section


def to_markdown(report: dict) -> str:
    """The whole report as Markdown text."""
    b = report["models"]["b"]
    mark = {"ok": "✓", "partial": "✗", "failed": "✗"}.get(digest.status(report), "•")
    lines = [
        f"# kvfuse report: {b['path'].replace(chr(92), '/').rsplit('/', 1)[-1]}",
        "",
        f"**{mark} {digest.headline(report)}**",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in verdict_rows(report)],
    ]
    lines += _blockers(report)
    lines += _ops(report) + _numerics(report) + _precision(report) + _quantization(report)
    lines += _io(report) + _rewrites(report) + _layers(report) + _models(report)
    return "\n".join(lines) + "\n"


def verdict_rows(report: dict) -> list[tuple[str, str]]:
    """The verdict card's figures as (label, text) rows."""
    a, b = report["models"]["a"], report["models"]["b"]
    meta = report.get("meta") or {}
    rows = []
    if digest.layers(report):
        rows.append(("layers fused", _layer_line(report)))
    rows.append(
        (
            "nodes",
            f"{a['nodes']:,} → {b['nodes']:,} ({digest.percent_change(a['nodes'], b['nodes'])})",
        )
    )
    rows.append(
        (
            "bytes on disk",
            f"{digest.size_pair(a['file_bytes'], b['file_bytes'])} (weights "
            f"{digest.size_pair(a['initializer_bytes'], b['initializer_bytes'])})",
        )
    )
    rows.append(("verification", _verification_line(report["numerics"])))
    kv = meta.get("kv")
    if kv:
        per_row = "" if kv["batch_size"] else " per batch row"
        rows.append(
            (
                "KV memory",
                f"{digest.mib(kv['bytes_per_row'])}{per_row}: {kv['buffers']} × "
                f"[{kv['batch_size'] or 'batch'}, {kv['kv_heads']}, {kv['max_context']}, "
                f"{kv['head_dim']}] {kv['dtype']}, fixed, bound in place",
            )
        )
    opsets = ", ".join(f"{d} {v}" for d, v in b["opsets"].items())
    rows.append(("target", f"{meta.get('target') or '—'} (opsets {opsets})"))
    rows.append(("quantization", _quantization_line(report.get("quantization"))))
    created = (meta.get("created") or "").replace("T", " ").replace("+00:00", " UTC")
    rows.append(("kvfuse", f"{meta.get('kvfuse_version', '?')}, {created}"))
    return rows


def _layer_line(report: dict) -> str:
    cells = digest.layer_cells(report)
    fused = [c["layer"] for c in cells if c["fused"]]
    missed = [c["layer"] for c in cells if not c["fused"]]
    text = f"{len(fused)}/{len(cells)}"
    if fused:
        text += f" — fused: {digest.ranges(fused)}"
    if missed:
        text += f"; **not fused: {digest.ranges(missed)}**"
    lowered = digest.lowering_summary(report)
    return text + (f" ({lowered})" if lowered else "")


def _verification_line(numerics: dict | None) -> str:
    if numerics is None:
        return "not verified"
    verdict = "passed" if numerics["passed"] else "**FAILED**"
    tokens = "equal" if numerics["tokens_equal"] else "**differ**"
    return (
        f"{verdict}: max \\|Δlogits\\| {numerics['max_abs_diff']:.2e} (tolerance "
        f"{numerics['atol']:g} + {numerics['rtol']:g}·\\|logit\\|), greedy tokens {tokens}, "
        f"prefill of {numerics['prompt_tokens']} + {len(numerics['steps']) - 1} decode steps"
        + (
            f" (recorded at optimize time in `{numerics['recorded_in']}`)"
            if numerics.get("recorded_in")
            else ""
        )
    )


def _quantization_line(quantization: dict | None) -> str:
    if not quantization:
        return "none (weights kept as exported)"
    return ", ".join(f"{k} {v}" for k, v in digest.quantization_figures(quantization)) or "yes"


def _blockers(report: dict) -> list[str]:
    groups = digest.blockers(report)
    if not groups:
        return []
    lines = ["", "**Why not:**", ""]
    for group in groups:
        text = f"- {digest.layer_list(group['layers'])}: {group['reason'].rstrip('.')}."
        if group["culprits"]:
            text += " Culprits: " + ", ".join(f"`{c}`" for c in group["culprits"][:4]) + "."
        if group["closest_rule"]:
            text += (
                f" Closest rule: **{group['closest_rule']}** ({group['closest_matched']} nodes "
                f"matched; stopped at: {group['closest_reason'].rstrip('.')})."
            )
        lines.append(text)
    return lines


def _ops(report: dict) -> list[str]:
    lines = ["", "## Op counts (largest changes first)", "", "| op | before | after | Δ |"]
    lines.append("|---|---|---|---|")
    lines += [
        f"| {r['op']} | {r['a']:,} | {r['b']:,} | {r['delta']:+,} |"
        for r in digest.op_changes(report, limit=20)
    ]
    return lines


def _precision(report: dict) -> list[str]:
    precision = report.get("precision")
    if precision is None:
        return []
    kept = precision["kept"]
    lines = ["", "## Precision", "", f"{precision['dtype']}; {len(kept)} nodes kept in float32."]
    if kept:
        lines += ["", "| node | op | why |", "|---|---|---|"]
        lines += [f"| `{k['node']}` | {k['op_type']} | {k['reason']} |" for k in kept]
    return lines


def _numerics(report: dict) -> list[str]:
    numerics = report["numerics"]
    if numerics is None:
        return ["", "## Numerics", "", "Not verified."]
    lines = [
        "",
        "## Numerics per verification step",
        "",
        "| step | max \\|Δ\\| | share of tolerance | token before | token after |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['step']} | {s['max_abs_diff']:.2e} | {digest.share(s['tolerance_used'])} | "
        f"{s['token_original']} | {s['token_rewritten']} |"
        for s in numerics["steps"]
    ]
    return lines


def _quantization(report: dict) -> list[str]:
    quantization = report.get("quantization")
    if not quantization:
        return []
    lines = ["", "## Quantization", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in digest.quantization_figures(quantization)]
    kld = quantization.get("kld") or []
    if kld:
        worst = max(range(len(kld)), key=kld.__getitem__)
        lines += [
            "",
            f"KLD per position over {len(kld):,} positions: mean {sum(kld) / len(kld):.4g}, "
            f"max {kld[worst]:.4g} at position {worst}.",
        ]
    lines += quant_section.to_markdown(report.get("quantization"))
    return lines


def _io(report: dict) -> list[str]:
    lines = ["", "## Inputs and outputs", "", "| what | names | change | before | after |"]
    lines.append("|---|---|---|---|---|")
    for group in digest.fold_io(report):
        after = digest.dims(group["b"])
        if group["in_place"]:
            after += f", same buffer as `{group['aliases_of']}` (bound in place)"
        before = digest.dims(group["a"])
        lines.append(
            f"| {group['label']} | `{group['pattern']}` | {group['change']} | {before} | {after} |"
        )
    return lines


def _rewrites(report: dict) -> list[str]:
    if not report["rewrites"]:
        return []
    lines = [
        "",
        "## Rewrites, one row per rule",
        "",
        "| rule | created | where | input nodes replaced |",
        "|---|---|---|---|",
    ]
    for row in digest.fold_rewrites(report):
        created = ", ".join(f"{op} ×{n}" for op, n in row["op_types"].most_common())
        where = digest.layer_list(row["layers"]) if row["layers"] else "whole graph"
        lines.append(f"| {row['rule']} | {created} | {where} | {row['replaced']:,} |")
    return lines


def _layers(report: dict) -> list[str]:
    if not digest.layers(report):
        return []
    fused = sum(layer["fused"] for layer in digest.layers(report))
    lines = ["", "## Attention layers", "", f"{fused} of {len(digest.layers(report))} fused.", ""]
    for group in digest.lowering_groups(report):
        why = f": {group['reason']}" if group["reason"] else ""
        lines.append(f"- {digest.layer_list(group['layers'])}: lowered as {group['lowering']}{why}")
    for miss in report["near_misses"]:
        culprits = ", ".join(f"`{c}`" for c in miss["culprits"])
        lines.append(
            f"- layer {miss['layer']}: **{miss['rule']}** ({miss['matched_nodes']} nodes "
            f"matched) — {miss['reason']}" + (f" [{culprits}]" if culprits else "")
        )
    return lines


def _models(report: dict) -> list[str]:
    a, b = report["models"]["a"], report["models"]["b"]
    structural = report["structural"]
    return [
        "",
        "## The two models",
        "",
        f"`{a['path']}` → `{b['path']}`; initializers {a['initializers']:,} → "
        f"{b['initializers']:,}; by node name {structural['removed']:,} removed, "
        f"{structural['added']:,} added, {structural['kept']:,} kept.",
    ]
