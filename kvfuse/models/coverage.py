"""Which architectures kvfuse fuses today, per exporter and target: a Markdown table made by
running it.

    python -m kvfuse.models.coverage [--work DIR] [--exporter optimum|dynamo ...]
                                     [--architecture NAME ...]

For each tiny model and exporter: build (seeded random weights), export (Optimum, or
torch.onnx's dynamo exporter), optimize for `ort` and for `onnx --static` (a prefill graph of
16 tokens and a decode graph sharing one weights file), verify each. The README's coverage
table is this command's output, never typed by hand.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kvfuse.errors import KvfuseError
from kvfuse.models.architectures import ARCHITECTURES, EXPORTERS, PENDING, positions_of


def coverage_row(name: str, work: Path, exporter: str = "optimum") -> str:
    """One table row: build the tiny model, export it with `exporter`, optimize, verify."""
    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_tiny_model
    from kvfuse.optimize import PartialFusion, optimize

    hf_dir = work / name
    if not (hf_dir / "config.json").is_file():
        build_tiny_model(name, hf_dir)
    lead = f"| {name} | {exporter} | {positions_of(name)}"
    try:
        exported = export(
            hf_dir, work / f"{name}-{exporter}", quiet=True, overwrite=True, exporter=exporter
        )
        runs = [
            optimize(
                exported.out_dir,
                work / f"{name}-{exporter}-{target}.onnx",
                max_context=64,
                quiet=True,
                overwrite=True,
                **options,
            )
            for target, options in TARGETS.items()
        ]
    except PartialFusion as failure:
        first = next(layer for layer in failure.result.layers if not layer.fused)
        reason = first.near_misses[0].reason if first.near_misses else "no rule came close"
        fused = f"{failure.result.fused_layers}/{len(failure.result.layers)}"
        return f"{lead} | {fused} | no | no | | {reason} |"
    except KvfuseError as error:
        return f"{lead} | ? | no | no | | {error} |"
    cells = [
        f"{'yes' if r.verification.passed else 'no'} (max Δ {r.verification.max_abs_diff:.0e}), "
        f"{r.nodes_before} → {r.nodes_after} nodes"
        for r in runs
    ]
    lowerings = " / ".join(lowering_summary(r.layers) for r in runs)
    return (
        f"{lead} | {runs[0].fused_layers}/{len(runs[0].layers)} | {' | '.join(cells)} "
        f"| {lowerings} | |"
    )


def lowering_summary(layers) -> str:
    """The lowerings a run's layers took, each once, with the layers that took it when they
    differ (e.g. "GroupQueryAttention: sliding window 6 … (layer 0); … (layer 1)")."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(f"{layer.lowering}: {layer.lowering_reason}", []).append(layer.layer)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{kind} (layers {', '.join(names)})" for kind, names in groups.items())


TARGETS = {
    "ort": {},
    "onnx-static": {"target": "onnx", "static": True, "prefill_len": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--exporter", action="append", choices=EXPORTERS, default=None)
    parser.add_argument(
        "--architecture", action="append", choices=[*ARCHITECTURES, *PENDING], default=None
    )
    args = parser.parse_args()
    exporters = args.exporter or list(EXPORTERS)
    names = args.architecture or [*ARCHITECTURES, *PENDING]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = [coverage_row(name, work, e) for name in names for e in exporters]
    print(
        "| architecture (tiny) | exporter | positions | layers fused | `ort`: verified, nodes "
        "| `onnx --static`: verified, nodes (decode graph) | lowering (`ort` / `onnx`) "
        "| why not |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
