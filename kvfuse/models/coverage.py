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
from kvfuse.models.architectures import (
    ARCHITECTURES,
    EXPORTERS,
    PENDING,
    exporters_of,
    positions_of,
)


def coverage_row(name: str, work: Path, exporter: str = "optimum") -> str:
    """One table row: build the tiny model, export it with `exporter`, optimize, verify."""
    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_tiny_model
    from kvfuse.optimize import PartialFusion, optimize

    hf_dir = work / name
    if not (hf_dir / "config.json").is_file():
        build_tiny_model(name, hf_dir)
    lead = f"| {name} | {exporter} | {positions_of(name)}"
    if name in ARCHITECTURES and exporter not in exporters_of(name):
        return f"{lead} | – | – | – | – | {exporter} has no export of this architecture |"
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
        return f"{lead} | {fused} | – | no | no | {reason} |"
    except KvfuseError as error:
        return f"{lead} | ? | – | no | no | {error} |"
    cells = [
        f"{'yes' if r.verification.passed else 'no'} (max Δ {r.verification.max_abs_diff:.0e}), "
        f"{r.nodes_before} → {r.nodes_after} nodes"
        for r in runs
    ]
    fused = f"{runs[0].fused_layers}/{len(runs[0].layers)}"
    return f"{lead} | {fused} | {lowerings(runs)} | {' | '.join(cells)} | |"


def lowerings(runs) -> str:
    """The lowerings the layers took, per target run (`ort` / `onnx --static`)."""
    return " / ".join(
        ", ".join(dict.fromkeys(layer.lowering for layer in run.layers if layer.lowering))
        for run in runs
    )


TARGETS = {
    "ort": {},
    "onnx-static": {"target": "onnx", "static": True, "prefill_len": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--exporter", action="append", choices=EXPORTERS, default=None)
    parser.add_argument(
        "--architecture", action="append", choices=sorted([*ARCHITECTURES, *PENDING])
    )
    args = parser.parse_args()
    exporters = args.exporter or list(EXPORTERS)
    names = args.architecture or [*ARCHITECTURES, *PENDING]
    print(
        "| architecture (tiny) | exporter | positions | layers fused | lowering (`ort` / `onnx`) "
        "| `ort`: verified, nodes | `onnx --static`: verified, nodes (decode graph) | why not |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in names:
            for exporter in exporters:  # each row as it is made: the whole run takes a while
                print(coverage_row(name, work, exporter), flush=True)


if __name__ == "__main__":
    main()
