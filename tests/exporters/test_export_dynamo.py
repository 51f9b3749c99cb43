"""`kvfuse export --exporter`: the choice is checked before anything is written."""

from __future__ import annotations

import pytest

from kvfuse.errors import KvfuseError
from kvfuse.exporters.export import export
from tests.exporters.test_export_errors import assert_one_line_error, run_cli


def test_unknown_exporter_is_refused_in_one_line(tmp_path):
    """A misspelt exporter names the choices; no output directory appears."""
    done = run_cli("export", "default", str(tmp_path / "out"), "--exporter", "dynamo2")
    assert_one_line_error(done, "unknown exporter 'dynamo2'", "optimum, dynamo")
    assert not (tmp_path / "out").exists()


def test_unknown_exporter_from_python(tmp_path):
    """The Python API refuses it the same way."""
    with pytest.raises(KvfuseError, match="choose one of optimum, dynamo"):
        export("default", tmp_path / "out", exporter="torchscript")


def test_local_functions_are_inlined():
    """A graph calling a local function (as the dynamo exporter may emit) has plain nodes
    after the export's inlining step, computing the same."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from kvfuse.exporters.dynamo import _inline_functions

    text = """
    <ir_version: 10, opset_import: ["" : 18, "local" : 1]>
    g (float[2, 4] x) => (float[2, 4] y) {
        y = local.scaled_square(x)
    }
    <domain: "local", opset_import: ["" : 18]>
    scaled_square (a) => (b) {
        two = Constant<value = float {2.0}>()
        sq = Mul(a, a)
        b = Mul(sq, two)
    }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    _inline_functions(model)
    assert not model.functions
    assert {node.domain for node in model.graph} == {""}
    proto = ir.serde.serialize_model(model).SerializeToString()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, 2 * x * x)


def test_cache_shapes_of_a_cache_wrapped_for_cross_attention():
    """GPTBigCode returns its cache inside an EncoderDecoderCache: the example inputs read each
    layer's (KV heads, head dim) from the self-attention cache it wraps (one KV head here)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvfuse.exporters import dynamo
    from kvfuse.exporters.metadata import ModelFacts
    from kvfuse.models.tiny import tiny_config

    config = tiny_config("gpt_bigcode")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    facts = ModelFacts.from_config(config)
    shapes = dynamo._cache_shapes(model, facts)
    assert shapes == [(1, config.n_embd // config.n_head)] * facts.num_layers
