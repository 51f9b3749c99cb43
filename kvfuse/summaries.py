"""What the `kvfuse` commands print on the terminal after they ran: the optimize summary (layers,
lowerings, precision, verification), the per-layer --explain table, the export summary."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(soft_wrap=True)  # long lines stay whole when piped (logs, CI, tests)


def print_optimize_summary(result, explain: bool) -> None:
    signature = result.signature
    console.print(
        f"[bold]{escape(str(result.output))}[/bold]: {result.fused_layers}/{len(result.layers)} "
        f"attention layers fused, {result.nodes_before:,} → {result.nodes_after:,} nodes, KV "
        f"buffers {escape(signature.shape_text())} shared past/present"
    )
    if signature.static:
        shared = result.shared_weights
        graphs = " + ".join(signature.static["graphs"].values())
        console.print(
            f"static pair: {escape(graphs)} (S = {signature.static['prefill_len']} and 1), one "
            f"weights file {escape(shared.file)} ({shared.bytes_total / 2**20:.0f} MiB, "
            f"{shared.tensors} tensors) read by both"
        )
    for line in lowering_lines(result.layers):
        console.print(escape(line))
    table = Table("rule", "fired", title="Rules")
    for rule, count in result.rule_counts.items():
        if count or explain:
            table.add_row(rule, str(count))
    console.print(table)
    if result.rewrite_verification is not None:
        console.print("float32 rewrite: " + result.rewrite_verification.summary())
    if result.precision is not None:
        print_precision(result.precision)
    if result.verification is not None:
        console.print(result.verification.summary())
    else:
        console.print("[yellow]verification skipped (--no-verify)[/yellow]")
    if explain:
        print_layers(result)


def print_precision(choice) -> None:
    console.print(
        f"{choice.dtype}: {choice.counts['precision/half_nodes']} nodes in {choice.dtype}, "
        f"{len(choice.kept)} kept in float32 for range"
        + ("" if choice.rounds else " (unchecked: --no-verify)")
    )
    for kept in choice.kept:
        console.print(f"  float32: {escape(kept.node)} ({kept.op_type}): {escape(kept.reason)}")


def lowering_lines(layers) -> list[str]:
    """One line per lowering kind: which layers took it and why (the first layer's reason)."""
    groups: dict[str, list] = {}
    for layer in layers:
        if layer.lowering:
            groups.setdefault(layer.lowering, []).append(layer)
    return [
        f"lowering {kind}: layers {', '.join(x.layer for x in group)} ({group[0].lowering_reason})"
        for kind, group in groups.items()
    ]


def print_layers(result) -> None:
    table = Table(
        "layer", "fused", "closest rule", "why not", "lowering", "why", title="Attention layers"
    )
    for layer in result.layers:
        miss = layer.near_misses[0] if layer.near_misses else None
        table.add_row(
            layer.layer,
            "yes" if layer.fused else "[red]no[/red]",
            miss.rule if miss and not layer.fused else "",
            escape(miss.reason if miss else "no rule came close") if not layer.fused else "",
            layer.lowering,
            escape(layer.lowering_reason),
        )
    Console(stderr=True).print(table)


def print_export_summary(result) -> None:
    facts, summary = result.facts, result.summary
    console.print(
        f"[bold]{result.onnx_path}[/bold]: {facts.architecture}, {facts.num_layers} layers, "
        f"{facts.num_heads} heads / {facts.num_kv_heads} KV heads × {facts.head_dim}, "
        f"vocab {facts.vocab_size}"
    )
    console.print(
        f"{summary.nodes:,} nodes, {summary.initializers} initializers, "
        f"{summary.file_bytes / 1e6:,.1f} MB on disk, opsets {summary.opsets}"
    )
    table = Table("op type", "count", title="Most frequent ops")
    for op, count in list(summary.op_histogram.items())[:12]:
        table.add_row(op, str(count))
    console.print(table)
    io = Table("", "name", "dims", title="Inputs and outputs")
    for kind, values in (("in", summary.inputs), ("out", summary.outputs)):
        shown = list(values.items())
        for name, dims in shown[:4] + ([("…", [])] if len(shown) > 5 else []) + shown[-1:]:
            io.add_row(kind, name, str(dims))
    console.print(io)
