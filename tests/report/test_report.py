"""Graph diff reports: schema, numbers against independent counts, formats, any two models."""

from __future__ import annotations

import collections
import json
import re
import types
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest

import kvfuse
from kvfuse.optimize import optimize
from kvfuse.report import digest, render, write_all
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
    model.graph.output.append(onnx.helper.make_tensor_value_info(probs, 1, ["b", "h", "s", "t"]))
    onnx.save(model, tmp_path / "in.onnx")
    with pytest.raises(PartialFusion) as failure:
        optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", max_context=32, quiet=True)
    report = build_report(tmp_path / "in.onnx", tmp_path / "in.onnx", failure.value.result)
    jsonschema.validate(report, SCHEMA)
    assert report["near_misses"]
    assert [(r["layer"], r["fused"]) for r in report["layers"]] == [("0", False)]
    written = write_all(report, tmp_path / "partial")
    assert "why not" in written[2].read_text()
    assert "other uses" in written[1].read_text() or "graph output" in written[1].read_text()


def test_markdown_opens_on_the_verdict(optimized_llama):
    """The Markdown has the HTML's order: headline and figures first, then the details."""
    before, after, result = optimized_llama
    text = render(build_report(before, after, result), ".md")
    order = [
        "**✓ Fused 2/2 attention layers into GroupQueryAttention",
        "| verification | passed",
        "| KV memory | ",
        "## Op counts",
        "## Numerics per verification step",
        "## Inputs and outputs",
        "## Rewrites",
        "## Attention layers",
    ]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "| 4 KV inputs | `past_key_values.*.key/value` | reshaped |" in text
    assert "same buffer as `past_key_values.*.key/value` (bound in place)" in text


def test_meta_names_target_version_and_kv_bytes(optimized_llama):
    """KV bytes per batch row, counted from the model's own inputs."""
    before, after, result = optimized_llama
    meta = build_report(before, after, result)["meta"]
    model = onnx.load(str(after), load_external_data=False)
    pasts = [v for v in model.graph.input if v.name.startswith("past_key_values")]
    per_row = sum(
        4 * int(np.prod([d.dim_value for d in v.type.tensor_type.shape.dim][1:])) for v in pasts
    )
    assert meta["kv"]["bytes_per_row"] == per_row and meta["kv"]["buffers"] == len(pasts) == 4
    assert meta["target"] == "ort" and meta["kvfuse_version"] == kvfuse.__version__
    assert meta["kv"]["max_context"] == 64 and meta["kv"]["dtype"] == "float32"


def test_lowering_and_quantization_are_reported(optimized_llama):
    """Each layer's lowering and why, and an optional quantization dict with per-position
    KLD reach the JSON (schema-valid), the cells and legend of the HTML, and the Markdown."""
    before, after, result = optimized_llama
    layers = [
        types.SimpleNamespace(
            layer=str(i), fused=True, near_misses=[], lowering=name, lowering_reason=why
        )
        for i, (name, why) in enumerate(
            [("gqa-rotary", "GQA rotates all 16 dims"), ("rotary-op+gqa", "rotary on 4 of 16")]
        )
    ]
    kld = [0.001, 0.004, 0.02, 0.003]
    quantization = {
        "scheme": "int4",
        "bits": 4,
        "block_size": 32,
        "mean_kld": 0.007,
        "same_top1": 0.975,
        "max_kld": 0.05,
        "kld": kld,
        "bytes_before": 4_000_000,
        "bytes_after": 1_100_000,
    }
    shaped = types.SimpleNamespace(
        **{**vars(result), "layers": layers, "quantization": quantization}
    )
    report = build_report(before, after, shaped)
    jsonschema.validate(report, SCHEMA)
    assert [(r["lowering"], r["lowering_reason"]) for r in report["layers"]] == [
        ("gqa-rotary", "GQA rotates all 16 dims"),
        ("rotary-op+gqa", "rotary on 4 of 16"),
    ]
    page = render(report, ".html")
    assert page.count("id='kld-chart'") == 1
    chart = page[page.index("id='kld-chart'") :].split("</svg>")[0]
    assert re.findall(r"data-value='([^']+)'", chart) == [f"{v:.6g}" for v in kld]
    assert "gqa-rotary" in page and "rotary-op+gqa: rotary on 4 of 16" in page
    assert "same top-1 97.5%" in page
    cells = re.findall(r"<a class='cell' href='#layer-(\d)' style='background:(#\w+)'", page)
    assert [c[0] for c in cells] == ["0", "1"] and cells[0][1] != cells[1][1]
    text = render(report, ".md")
    assert "## Quantization" in text and "mean KLD 0.007" in text
    assert "lowered as gqa-rotary ×1, rotary-op+gqa ×1" in text
    broken = dict(report, quantization={**quantization, "kld": ["high"]})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_near_misses_group_by_cause():
    """Layers stopped by the same structure are one line: the diagnosis in words, the culprits
    and the rule that came closest."""

    def miss(layer, rule, matched, reason, culprits):
        return {
            "layer": layer,
            "rule": rule,
            "root": "r",
            "matched_nodes": matched,
            "reason": reason,
            "culprits": culprits,
        }

    report = {
        "layers": [{"layer": str(i), "fused": i not in (3, 4, 9)} for i in range(12)],
        "near_misses": [
            *(
                m
                for layer in ("3", "4")
                for m in (
                    miss(
                        layer,
                        "attention/sdpa (diagnosis)",
                        0,
                        "probs are a graph output",
                        [f"Softmax_{layer}"],
                    ),
                    miss(layer, "attention/sdpa_bhsd", 7, "other uses", []),
                    miss(layer, "attention/cached_bhsd", 2, "mismatch", []),
                )
            ),
            miss("9", "attention/cached_bhsd", 5, "key perm [0, 2, 1, 3]", ["Transpose_9"]),
        ],
        "rewrites": [],
        "numerics": None,
    }
    groups = digest.blockers(report)
    assert [g["layers"] for g in groups] == [["3", "4"], ["9"]]
    assert groups[0]["reason"] == "probs are a graph output"
    assert groups[0]["culprits"] == ["Softmax_3", "Softmax_4"]
    assert (groups[0]["closest_rule"], groups[0]["closest_matched"]) == ("attention/sdpa_bhsd", 7)
    assert groups[1]["reason"] == "key perm [0, 2, 1, 3]"
    assert digest.status(report) == "partial" and digest.layer_list(["3", "4"]) == "layers 3–4"
    assert digest.headline(report).startswith("Not optimized: 9 of 12 attention layers fused")


def test_diff_of_an_optimize_output_reads_its_recorded_verification(optimized_llama):
    """`kvfuse diff` of a model kvfuse wrote shows the verification optimize recorded in the
    sidecar beside it, figure for figure; a model without a sidecar stays "not verified"."""
    before, after, result = optimized_llama
    numerics = diff(before, after)["numerics"]
    assert numerics["recorded_in"] == str(after.with_name(f"{after.stem}.kvfuse.json"))
    assert numerics["max_abs_diff"] == result.verification.max_abs_diff
    assert [s["tolerance_used"] for s in numerics["steps"]] == [
        s.tolerance_used for s in result.verification.steps
    ]
    assert "recorded at optimize time" in render(diff(before, after), ".html")
    assert diff(after, before)["numerics"] is None
