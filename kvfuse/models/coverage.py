"""Which architectures the `ort` target fuses today: a Markdown table made by running it.

    python -m kvfuse.models.coverage [--work DIR]

For each tiny model: build (seeded random weights), export with Optimum, optimize, verify.
The README's coverage table is this command's output, never typed by hand.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kvfuse.errors import KvfuseError
from kvfuse.models.architectures import ARCHITECTURES


def coverage_row(name: str, work: Path) -> str:
    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_tiny_model
    from kvfuse.rewriter.optimize import PartialFusion, optimize

    hf_dir = build_tiny_model(name, work / name)
    exported = export(hf_dir, work / f"{name}-onnx", quiet=True, overwrite=True)
    facts = ARCHITECTURES[name]
    try:
        result = optimize(
            exported.out_dir, work / f"{name}.onnx", max_context=64, quiet=True, overwrite=True
        )
    except PartialFusion as failure:
        first = next(layer for layer in failure.result.layers if not layer.fused)
        reason = first.near_misses[0].reason if first.near_misses else "no rule came close"
        fused = f"{failure.result.fused_layers}/{len(failure.result.layers)}"
        return f"| {name} | {facts.get('rope') or 'learned'} | {fused} | no | — | {reason} |"
    except KvfuseError as error:
        return f"| {name} | {facts.get('rope') or 'learned'} | ? | no | — | {error} |"
    verification = result.verification
    return (
        f"| {name} | {facts.get('rope') or 'learned'} | {result.fused_layers}/"
        f"{len(result.layers)} | {'yes' if verification.passed else 'no'} "
        f"(max Δ {verification.max_abs_diff:.0e}) | {result.nodes_before} → "
        f"{result.nodes_after} | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = [coverage_row(name, work) for name in ARCHITECTURES]
    print(
        "| architecture (tiny, Optimum export) | positions | layers fused | verified | "
        "nodes | why not |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
