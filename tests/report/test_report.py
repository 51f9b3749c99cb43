"""Graph diff reports: schema, numbers against independent counts, formats, any two models."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jsonschema
import onnx
import pytest

from kvfuse.optimize import optimize
from kvfuse.report import render, write_all
from kvfuse.report.diff import build_report, diff
from tests.exporters.test_export_errors import run_cli
from tests.rewriter.synthetic import build_lm

SCHEMA = json.loads((Path(__file__).parents[2] / "kvfuse/report/schema.json").read_text())


@pytest.fixture(scope="module")
def optimized_llama(tiny_export, tmp_path_factory):
    _, export_dir = tiny_export("llama")
    out = tmp_path_factory.mktemp("report") / "llama.onnx"
    result = optimize(export_dir, out, max_context=64, quiet=True)
    return export_dir / "model.onnx", out, result


def test_report_follows_the_schema(optimized_llama):
    before, after, result = optimized_llama
    report = build_report(before, after, result)
    jsonschema.validate(report, SCHEMA)
    jsonschema.validate(json.loads(render(report, ".json")), SCHEMA)
    assert report["schema"] == SCHEMA["properties"]["schema"]["const"]


def test_schema_rejects_a_malformed_report(optimized_llama):
    """The schema is not a rubber stamp: a wrong type is refused."""
    before, after, result = optimized_llama
    report = build_report(before, after, result)
    report["models"]["a"]["nodes"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, SCHEMA)


def test_numbers_match_independent_counts(optimized_llama):
    """Node counts, op histograms, rewrites and aliases agree with counts taken directly."""
    before, after, result = optimized_llama
    report = build_report(before, after, result)
    a, b = onnx.load(str(before)), onnx.load(str(after))
    assert report["models"]["a"]["nodes"] == len(a.graph.node)
    assert report["models"]["b"]["nodes"] == len(b.graph.node)
    ops_b = collections.Counter(n.op_type for n in b.graph.node)
    assert {r["op"]: r["b"] for r in report["ops"] if r["b"]} == dict(ops_b)
    assert report["models"]["b"]["initializer_bytes"] == sum(
        onnx.numpy_helper.to_array(t).nbytes for t in b.graph.initializer
    )
    assert report["rewrites_by_rule"]["attention/cached_bhsd_rope"] == ops_b["GroupQueryAttention"]
    assert len(report["io"]["aliases"]) == 4
    names_a = {n.name for n in a.graph.node}
    names_b = {n.name for n in b.graph.node}
    gqa = [r for r in report["rewrites"] if r["op_type"] == "GroupQueryAttention"]
    assert {r["layer"] for r in gqa} == {"0", "1"}
    for rewrite in gqa:
        replaced = {x["name"] for x in rewrite["replaced"]}
        assert replaced <= names_a and not replaced & names_b
        kinds = {x["op_type"] for x in rewrite["replaced"]}
        assert {"Softmax", "Concat", "Transpose", "MatMul"} <= kinds
    removed = {r["name"] for r in report["io"]["inputs"] if r["change"] == "removed"}
    assert removed == {"attention_mask", "position_ids"}
    assert report["numerics"]["passed"] and len(report["numerics"]["steps"]) == 9
    assert [(r["layer"], r["fused"], r["lowering"]) for r in report["layers"]] == [
        ("0", True, "gqa-rotary"),
        ("1", True, "gqa-rotary"),
    ]


def test_diff_of_models_kvfuse_did_not_write(tiny_export, tmp_path):
    """Two arbitrary ONNX files: the structural diff and op deltas still work."""
    _, llama = tiny_export("llama")
    _, qwen = tiny_export("qwen2")
    report = diff(llama / "model.onnx", qwen / "model.onnx")
    jsonschema.validate(report, SCHEMA)
    assert report["rewrites"] == [] and report["picture"] is None
    a = collections.Counter(n.op_type for n in onnx.load(str(llama / "model.onnx")).graph.node)
    b = collections.Counter(n.op_type for n in onnx.load(str(qwen / "model.onnx")).graph.node)
    assert {r["op"]: r["delta"] for r in report["ops"]} == {
        op: b[op] - a[op] for op in set(a) | set(b)
    }
    structural = report["structural"]
    assert structural["kept"] + structural["removed"] == sum(a.values())
    assert structural["kept"] + structural["added"] == sum(b.values())


def test_cli_writes_every_format(optimized_llama, tmp_path):
    before, after, _ = optimized_llama
    for suffix in (".html", ".json", ".md"):
        done = run_cli("diff", str(before), str(after), "-o", str(tmp_path / f"r{suffix}"))
        assert done.returncode == 0, done.stderr
    assert "<svg" in (tmp_path / "r.html").read_text()
    assert "## Rewrites" in (tmp_path / "r.md").read_text()
    jsonschema.validate(json.loads((tmp_path / "r.json").read_text()), SCHEMA)
    done = run_cli("diff", str(before), str(after))  # to the terminal
    assert done.returncode == 0 and "GroupQueryAttention" in done.stdout


def test_optimize_report_flag(tiny_export, tmp_path):
    _, export_dir = tiny_export("qwen2")
    done = run_cli(
        "optimize",
        str(export_dir),
        str(tmp_path / "q.onnx"),
        "--max-context",
        "32",
        "--report",
        str(tmp_path / "q-report"),
    )
    assert done.returncode == 0, done.stderr
    for suffix in (".json", ".md", ".html"):
        assert (tmp_path / f"q-report{suffix}").is_file()
    report = json.loads((tmp_path / "q-report.json").read_text())
    assert report["numerics"]["passed"] and report["layers"][0]["fused"]


def test_every_format_renders_a_partial_fusion(tmp_path):
    """A report of a model whose attention did not fuse lists the near misses."""
    from kvfuse.optimize import PartialFusion

    model = build_lm("BHSD")
    probs = next(n for n in model.graph.node if n.op_type == "Softmax").output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(probs, 1, None))
    onnx.save(model, tmp_path / "in.onnx")
    with pytest.raises(PartialFusion) as failure:
        optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", max_context=32, quiet=True)
    report = build_report(tmp_path / "in.onnx", tmp_path / "in.onnx", failure.value.result)
    jsonschema.validate(report, SCHEMA)
    assert report["near_misses"] and report["layers"] == [{"layer": "0", "fused": False}]
    written = write_all(report, tmp_path / "partial")
    assert "why not" in written[2].read_text()
    assert "other uses" in written[1].read_text() or "graph output" in written[1].read_text()
