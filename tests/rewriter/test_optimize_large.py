"""A model past protobuf's 2 GiB limit, end to end: exported with external weights, optimized
without ever holding them in one protobuf or twice in memory, verified, generating.

Each stage runs in its own process (as a user runs them), so optimize's peak resident memory
is measured alone (`os.wait4` of that child).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

CLI = [sys.executable, "-c", "from kvfuse.cli import main; main()"]
RSS_BOUND = 1.5  # optimize's peak RSS ≤ 1.5 × the model's weight bytes


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _peak_rss_bytes(args: list[str], log) -> int:
    """Run the CLI with `args` in a child; its exit status must be 0; return its peak RSS."""
    child = subprocess.Popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT, env=_env())
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    assert child.returncode == 0, log.read()[-2000:]
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def _external_entries(path) -> list[dict]:
    header = onnx.load(str(path), load_external_data=False)
    return [{e.key: e.value for e in t.external_data} for t in header.graph.initializer]


@pytest.fixture
def scratch(tmp_path):
    """A directory removed at the end whatever happens: this test writes ~7.5 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_model_past_two_gib_optimizes_verifies_and_generates(scratch):
    """A random 2.49 GB fp32 Llama (2 wide layers, untied 32k head): weights stay in one external
    file through export and optimize, optimize's peak RSS ≤ 1.5× the weights, verification
    passes, the optimized model generates; an external location escaping its folder is refused."""
    hf_dir, export_dir = scratch / "hf", scratch / "onnx"
    build = "import sys; from kvfuse.models.tiny import build_large_model as b; b(*sys.argv[1:])"
    subprocess.run(
        [sys.executable, "-c", build, "llama_2gb", str(hf_dir)], check=True, env=_env(), timeout=600
    )
    _run("export", str(hf_dir), str(export_dir), "--exporter", "dynamo", "--quiet")
    shutil.rmtree(hf_dir)
    weights = (export_dir / "model.onnx.data").stat().st_size
    assert weights > 2.3 * 2**30 and (export_dir / "model.onnx").stat().st_size < 2**20

    output = export_dir / "model-kvfuse.onnx"
    with (scratch / "optimize.log").open("w+") as log:
        args = ["optimize", str(export_dir), str(output), "--max-context", "64", "--quiet"]
        peak = _peak_rss_bytes(args, log)
    print(f"optimize peak RSS {peak / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of weights")
    assert peak <= RSS_BOUND * weights, (peak, weights)
    assert output.stat().st_size < 2**20  # the graph only: every weight is in the data file
    assert (export_dir / "model-kvfuse.onnx.data").stat().st_size >= weights * 0.99
    large = [e for e in _external_entries(output) if int(e["length"]) >= 2**20]
    assert large and all(int(e["offset"]) % 65536 == 0 for e in large)  # mappable offsets
    record = json.loads((export_dir / "model-kvfuse.kvfuse.json").read_text())
    assert record["verification"]["passed"]
    assert record["rule_counts"]["attention/cached_bhsd_rope"] == 2

    done = _run("run", str(output), "--prompt", "hi", "--raw", "--max-new-tokens", "4")
    assert "decode" in done.stderr and "(4 tokens)" in done.stderr

    # the same graph pointing at the data file through "..": refused before anything is read
    (scratch / "escape").mkdir()
    header = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    for tensor in header.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"../onnx/{entry.value}"
    onnx.save(header, str(scratch / "escape" / "model.onnx"))
    refused = subprocess.run(
        [*CLI, "optimize", str(scratch / "escape" / "model.onnx"), str(scratch / "x.onnx")],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert refused.returncode == 1 and "outside its directory" in refused.stderr
    assert "Traceback" not in refused.stderr and not (scratch / "x.onnx").exists()
