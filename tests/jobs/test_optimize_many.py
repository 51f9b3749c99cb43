"""`kvfuse optimize-many` end to end: three tiny models and one that fails, run locally
(interrupted, then resumed) and as tasks of a local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

NAMES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def models_file(tiny_export, tmp_path_factory) -> Path:
    """Three tiny models (the qwen2 one for the `onnx` target) and a directory whose config
    names an architecture transformers does not know."""
    root = tmp_path_factory.mktemp("models")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    models = [str(tiny_export(name)[0]) for name in NAMES]
    document = {
        "defaults": {
            "max_context": 64,
            "benchmark": {"prompt_tokens": 8, "new_tokens": 4},
            "resources": {"cpus": 1, "memory_gb": 1},
        },
        "models": [
            models[0],
            {"source": models[1], "target": "onnx", "name": "qwen2-onnx"},
            models[2],
            "broken",  # relative to the models file
        ],
    }
    path = root / "models.json"
    path.write_text(json.dumps(document))
    return path


def kvfuse(*args: str) -> subprocess.Popen:
    """The CLI in a process of its own, with Ctrl-C's default meaning even when the tests run
    where SIGINT is ignored (a background job of a non-interactive shell)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvfuse", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finished(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def check_index(out_root: Path) -> dict[str, dict]:
    """The index lists the four models in file order: three verified, fused, benchmarked and
    linked to reports that exist; the broken one failed with its one-line reason."""
    index = json.loads((out_root / "index.json").read_text())
    rows = {row["name"]: row for row in index["models"]}
    assert list(rows) == ["llama", "qwen2-onnx", "gpt2", "broken"]
    for name in ("llama", "qwen2-onnx", "gpt2"):
        row = rows[name]
        assert row["status"] == "ok", row.get("reason")
        assert row["layers_fused"] == row["layers"] == 2
        assert row["nodes_after"] < row["nodes_before"]
        assert row["verification"]["passed"] and row["verification"]["tokens_equal"]
        assert row["benchmark"]["decode_tokens_per_s"] > 0 and row["benchmark"]["prefill_ms"] > 0
        graph = out_root / name / row["model"]
        weights = graph.with_name(f"{graph.name}.data")  # mapped weights beside the graph
        assert row["bytes"] == graph.stat().st_size + weights.stat().st_size
        assert (out_root / name / "report.html").is_file()
    assert rows["qwen2-onnx"]["options"]["target"] == "onnx"
    broken = rows["broken"]
    assert broken["status"] == "failed"
    assert "no_such_architecture" in broken["reason"] and "\n" not in broken["reason"]
    assert sorted(p.name for p in (out_root / "broken").iterdir()) == ["job.json", "job.log"]
    page = (out_root / "index.html").read_text()
    for name in ("llama", "qwen2-onnx", "gpt2"):
        assert f'href="{name}/report.html"' in page
    assert "no_such_architecture" in page
    assert not list(out_root.glob(".*")), "staging directories left behind"
    pids = {row["worker"]["pid"] for row in rows.values()}
    assert len(pids) == 4, "each job runs in a process of its own"
    return rows


def test_local_run_interrupted_then_resumed(models_file, tmp_path):
    """Interrupted after its first model, the run keeps what finished; run again, it redoes
    only the models that had not finished, and the index has all four rows."""
    out_root = tmp_path / "out"
    run = kvfuse("optimize-many", str(models_file), str(out_root), "--jobs", "2", "--quiet")
    deadline = time.monotonic() + 300
    while not list(out_root.glob("*/job.json")):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    code, _, err = finished(run)
    assert code == 130 and "interrupted" in err
    done_first = {p.parent.name: p.stat().st_mtime_ns for p in out_root.glob("*/job.json")}
    assert 1 <= len(done_first) < 4

    code, out, err = finished(
        kvfuse("optimize-many", str(models_file), str(out_root), "--jobs", "2", "-q")
    )
    assert code == 0, err
    assert "3 of 4 models optimized" in out
    rows = check_index(out_root)
    for name, mtime in done_first.items():
        assert rows[name]["reused"], f"{name} was redone"
        assert (out_root / name / "job.json").stat().st_mtime_ns == mtime
    assert not all(row.get("reused") for row in rows.values())

    # nothing changed: a third run redoes nothing
    code, out, _ = finished(kvfuse("optimize-many", str(models_file), str(out_root), "-q"))
    assert code == 0 and "(4 reused from an earlier run)" in out


def test_ray_run(models_file, tmp_path, ray_cluster):
    """The same models file, unchanged, through a local Ray cluster: one task per model, the
    outputs sent back to the driver and unpacked under OUT_ROOT."""
    out_root = tmp_path / "out-ray"
    run = kvfuse("optimize-many", str(models_file), str(out_root), "--ray", ray_cluster, "-q")
    code, out, err = finished(run)
    assert code == 0, err
    assert "3 of 4 models optimized (0 reused" in out
    rows = check_index(out_root)
    assert os.getpid() not in {row["worker"]["pid"] for row in rows.values()}


def test_malformed_models_file_is_refused_with_the_field_path(tmp_path):
    """A bad value is refused in one line naming its JSON path; nothing is written."""
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": ["default", {"source": "x", "max_context": "long"}]}))
    code, out, err = finished(kvfuse("optimize-many", str(models), str(tmp_path / "out")))
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "models[1].max_context" in err and "'long' is not of type 'integer'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_job_whose_process_dies_is_its_failed_row(tiny_export, tmp_path):
    """A job process killed from outside (as the out-of-memory killer would) becomes that
    model's row, with the signal, instead of hanging the run."""
    import psutil

    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": [str(tiny_export("llama")[0])]}))
    run = kvfuse("optimize-many", str(models), str(tmp_path / "out"), "-q")
    deadline = time.monotonic() + 120
    while True:
        assert run.poll() is None and time.monotonic() < deadline
        children = psutil.Process(run.pid).children()
        jobs = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        if jobs:
            break
        time.sleep(0.1)
    jobs[0].kill()
    code, out, _ = finished(run)
    assert code == 0 and "0 of 1 models optimized" in out
    row = json.loads((tmp_path / "out" / "index.json").read_text())["models"][0]
    assert row["status"] == "failed"
    assert row["reason"] == "the job's process died (killed by signal 9) (out of memory?)"
