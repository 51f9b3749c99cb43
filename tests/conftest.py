"""Shared fixtures: tiny models exported once per session, and the real SmolLM2 export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Factory: `tiny_export(name)` → (hf_dir, export_dir) of a tiny model, built once."""
    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            hf_dir = build_tiny_model(name, root / name)
            export(hf_dir, root / f"{name}-onnx", quiet=True)
            done[name] = (hf_dir, root / f"{name}-onnx")
        return done[name]

    return get


@pytest.fixture(scope="session")
def layerwise_export(tmp_path_factory):
    """Factory: `layerwise_export(name)` → (hf_dir, export_dir) of a tiny Llama whose layers
    differ in KV heads or head dim (`tiny.LAYERWISE_CONFIGS`, its own model code), exported
    once per session with the dynamo exporter."""
    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_layerwise_model

    root = tmp_path_factory.mktemp("layerwise")
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            hf_dir = build_layerwise_model(name, root / name)
            out = root / f"{name}-onnx"
            export(hf_dir, out, quiet=True, exporter="dynamo", trust_remote_code=True)
            done[name] = (hf_dir, out)
        return done[name]

    return get


@pytest.fixture(scope="session")
def layerwise_optimized(layerwise_export, tmp_path_factory):
    """Factory: `layerwise_optimized(name, target)` → the `OptimizeResult` of that model for
    "ort" (dynamic batch) or "onnx-static" (prefill 16), 64 positions; optimized once."""
    from kvfuse.optimize import optimize

    targets = {
        "ort": {"target": "ort"},
        "onnx-static": {"target": "onnx", "static": True, "prefill_len": 16},
    }
    root = tmp_path_factory.mktemp("layerwise-optimized")
    done: dict[tuple[str, str], object] = {}

    def get(name: str, target: str):
        if (name, target) not in done:
            _, export_dir = layerwise_export(name)
            out = root / f"{name}-{target}" / "m.onnx"
            done[name, target] = optimize(
                export_dir, out, max_context=64, quiet=True, **targets[target]
            )
        return done[name, target]

    return get


@pytest.fixture(scope="session")
def dtype_export(tmp_path_factory):
    """Factory: `dtype_export(name, exporter, dtype)` → the export dir of a tiny model in that
    dtype (fp16/bf16 tests), built once per session."""
    from kvfuse.exporters.export import export
    from kvfuse.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("dtype")
    hf_dirs: dict[str, Path] = {}
    done: dict[tuple[str, str, str], Path] = {}

    def get(name: str, exporter: str, dtype: str) -> Path:
        if name not in hf_dirs:
            hf_dirs[name] = build_tiny_model(name, root / name)
        key = (name, exporter, dtype)
        if key not in done:
            out = root / f"{name}-{exporter}-{dtype}"
            export(hf_dirs[name], out, exporter=exporter, dtype=dtype, quiet=True)
            done[key] = out
        return done[key]

    get.hf_dir = lambda name: hf_dirs[name]
    return get


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """The bundled default model exported once per session through the CLI entry point
    (`python -m kvfuse export default OUT`, the README's first step): the `ExportResult` read
    back from what it wrote, with the command's stdout as `cli_stdout`."""
    import subprocess
    import sys
    import types

    from kvfuse.exporters.export import ExportResult
    from kvfuse.exporters.metadata import ModelFacts, read_metadata
    from kvfuse.report.summary import summarize

    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    command = [sys.executable, "-m", "kvfuse", "export", "default", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    facts = ModelFacts(**read_metadata(out)["model"])
    result = ExportResult(out, out / "model.onnx", facts, summarize(out / "model.onnx"))
    return types.SimpleNamespace(**vars(result), cli_stdout=done.stdout)


@pytest.fixture(scope="session")
def optimized_smollm2(smollm2_export):
    """SmolLM2's export optimized for `ort` with a 256-position context, beside its tokenizer."""
    from kvfuse.optimize import optimize

    return optimize(
        smollm2_export.out_dir,
        smollm2_export.out_dir / "model-kvfuse.onnx",
        max_context=256,
        quiet=True,
    )


@pytest.fixture(scope="session")
def static_smollm2(smollm2_export):
    """SmolLM2 optimized for `onnx --static`: prefill graph S = 64, decode graph S = 1, 256
    positions, one shared weights file."""
    from kvfuse.optimize import optimize

    return optimize(
        smollm2_export.out_dir,
        smollm2_export.out_dir / "model-static.onnx",
        target="onnx",
        static=True,
        prefill_len=64,
        max_context=256,
        quiet=True,
    )


@pytest.fixture(scope="session")
def tiny_served_model(tiny_export, tmp_path_factory):
    """The tiny Llama optimized for `ort` with a dynamic batch and a 128-position context: the
    model the server tests serve."""
    from kvfuse.optimize import optimize

    _, export_dir = tiny_export("llama")
    out = tmp_path_factory.mktemp("served") / "model.onnx"
    optimize(export_dir, out, max_context=128, quiet=True)
    return out


@pytest.fixture(scope="session")
def quantized_smollm2(smollm2_export):
    """Factory: SmolLM2 optimized for `ort` with `--quantize MODE` (256 positions, quality over
    128 tokens), built once per mode."""
    from kvfuse.optimize import optimize
    from kvfuse.quantization import Quantize

    done = {}

    def get(mode: str):
        if mode not in done:
            done[mode] = optimize(
                smollm2_export.out_dir,
                smollm2_export.out_dir / f"model-{mode}.onnx",
                max_context=256,
                quantize=Quantize(mode, quality_tokens=128),
                quiet=True,
            )
        return done[mode]

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (start-up takes ~10 s): its GCS address, for
    drivers in other processes to join (`--ray ADDRESS`); this process is a driver too."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# tryfirst: xdist's own hook turns the xdist_group marks into each test's `@group` suffix, and
# the conftest loaded at start-up would otherwise run after it (marks added too late: the
# SmolLM2 fixtures were then built on both workers, ~4 min of setup twice)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Under xdist's loadgroup: the real-model tests run on one worker (one SmolLM2 export per
    run, not one per worker), and the tests on the session's Ray cluster on one worker too."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("smollm2"))
        elif "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))
