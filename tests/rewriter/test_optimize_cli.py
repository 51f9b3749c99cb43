"""`kvfuse optimize` from the shell: good runs report, bad input gives one line, nothing lost."""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper

from tests.exporters.test_export_errors import assert_one_line_error, run_cli
from tests.rewriter.synthetic import build_lm


def test_optimize_reports_fusion_and_verification(tmp_path):
    """A successful run prints layers fused, the node counts and the verification line."""
    onnx.save(build_lm("BSHD"), tmp_path / "in.onnx")
    done = run_cli(
        "optimize",
        str(tmp_path / "in.onnx"),
        str(tmp_path / "out.onnx"),
        "--max-context",
        "32",
        "--explain",
    )
    assert done.returncode == 0, done.stderr
    assert "1/1 attention layers fused" in done.stdout
    assert "verification passed" in done.stdout
    assert "attention/cached_bshd_rope" in done.stdout
    assert (tmp_path / "out.onnx").is_file() and (tmp_path / "out.kvfuse.json").is_file()


def test_missing_input(tmp_path):
    done = run_cli("optimize", str(tmp_path / "nope.onnx"), str(tmp_path / "out.onnx"))
    assert_one_line_error(done, "nope.onnx does not exist")


def test_corrupt_onnx_file(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage that is not protobuf")
    done = run_cli("optimize", str(tmp_path / "bad.onnx"), str(tmp_path / "out.onnx"))
    assert_one_line_error(done, "is not a readable ONNX model")
    assert not (tmp_path / "out.onnx").exists()


def test_model_without_attention(tmp_path):
    """A model with no Softmax anywhere is reported as having no attention."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph, ir_version=10), tmp_path / "relu.onnx")
    done = run_cli("optimize", str(tmp_path / "relu.onnx"), str(tmp_path / "out.onnx"))
    assert_one_line_error(done, "has no attention")
    assert not (tmp_path / "out.onnx").exists()


def test_output_over_input_is_refused(tmp_path):
    onnx.save(build_lm("BHSD"), tmp_path / "in.onnx")
    before = (tmp_path / "in.onnx").read_bytes()
    done = run_cli(
        "optimize",
        str(tmp_path / "in.onnx"),
        str(tmp_path / "in.onnx"),
        "--overwrite",
        "--max-context",
        "32",
    )
    assert_one_line_error(done, "would overwrite the input")
    assert (tmp_path / "in.onnx").read_bytes() == before


def test_existing_output_needs_overwrite(tmp_path):
    onnx.save(build_lm("BHSD"), tmp_path / "in.onnx")
    (tmp_path / "out.onnx").write_text("keep")
    done = run_cli(
        "optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--max-context", "32"
    )
    assert_one_line_error(done, "already exists")
    assert (tmp_path / "out.onnx").read_text() == "keep"


def test_partial_fusion_names_layers_and_reason(tmp_path):
    """A layer whose key is transposed with a perm no layout uses does not fuse: the error
    lists the layer and the reason."""
    model = build_lm("BHSD")
    key_transpose = next(
        n
        for n in model.graph.node
        if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 1, 3, 2]
    )
    key_transpose.attribute[0].ints[:] = [1, 0, 3, 2]
    onnx.save(model, tmp_path / "in.onnx")
    out, stem = str(tmp_path / "out.onnx"), tmp_path / "why"
    done = run_cli("optimize", str(tmp_path / "in.onnx"), out, "--explain", "--report", str(stem))
    assert_one_line_error(done, "0 of 1 attention layers fused", "not fused: 0")
    assert "Attention layers" in done.stderr  # the --explain table
    assert "perm" in done.stderr  # the reason names the transpose perm
    assert not (tmp_path / "out.onnx").exists()
    # --report still explains the failure: the verdict and the near miss, no model written
    page = stem.with_suffix(".html").read_text()
    assert "Not optimized: 0 of 1 attention layers fused" in page and "perm" in page
    assert json.loads(stem.with_suffix(".json").read_text())["near_misses"]


def test_external_data_outside_the_model_directory_is_refused(tmp_path):
    """Weights pointing outside the model's directory are not read (untrusted input)."""
    model = build_lm("BHSD")
    weight = model.graph.initializer[0]
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    weight.ClearField("raw_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    (tmp_path / "m").mkdir()
    onnx.save(model, tmp_path / "m" / "in.onnx")
    done = run_cli("optimize", str(tmp_path / "m" / "in.onnx"), str(tmp_path / "out.onnx"))
    assert_one_line_error(done, "points its weights outside its directory")
