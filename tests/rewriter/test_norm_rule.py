"""Golden test of the RMSNorm rules on a tiny graph, run in onnxruntime before and after."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from kvfuse.patterns import lower_ort, norm
from kvfuse.rewriter.rules import RULE_TAG, apply_rules

# residual add, then x · w / sqrt(mean(x²) + ε) written the way TorchScript exports it
GRAPH = """
<ir_version: 10, opset_import: ["" : 18]>
rms (float[2, 3, 8] a, float[2, 3, 8] b) => (float[2, 3, 8] y, float[2, 3, 8] residual) {
    residual = Add(a, b)
    two = Constant<value = float {2.0}>()
    squared = Pow(residual, two)
    axes = Constant<value = int64[1] {-1}>()
    mean = ReduceMean<keepdims = 1>(squared, axes)
    eps = Constant<value = float {1e-6}>()
    shifted = Add(mean, eps)
    root = Sqrt(shifted)
    one = Constant<value = float {1.0}>()
    inv = Div(one, root)
    normed = Mul(residual, inv)
    w = Constant<value = float[8] {0.5, 1.0, 1.5, 2.0, 0.1, 0.2, 0.3, 0.4}>()
    y = Mul(normed, w)
}
"""


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def test_rms_norm_fuses_and_lowers_to_skip_simplified_layer_norm():
    """norm/rms fires once; lowering makes one SkipSimplifiedLayerNormalization; same outputs."""
    proto = onnx.parser.parse_model(GRAPH)
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.normal(size=(2, 3, 8)).astype(np.float32),
        "b": rng.normal(size=(2, 3, 8)).astype(np.float32),
    }
    before = run(proto, feeds)
    model = ir.serde.deserialize_model(proto)
    assert apply_rules(model, norm.RULES) == {"norm/rms": 1}
    assert lower_ort.lower_skip_rms_norms(model) == {"lower/skip_rms": 1}
    ops = [node.op_type for node in model.graph]
    assert ops.count("SkipSimplifiedLayerNormalization") == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Div", "Add"} & set(ops)
    fused = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert fused.metadata_props[RULE_TAG] == "lower/skip_rms"
    model.opset_imports["com.microsoft"] = 1
    after = run(ir.serde.serialize_model(model), feeds)
    for expected, found in zip(before, after, strict=True):
        np.testing.assert_allclose(found, expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_not_fused_over_the_wrong_axis():
    """A mean over axis 1 is not an RMSNorm; the reason says which axes were found."""
    proto = onnx.parser.parse_model(GRAPH.replace("int64[1] {-1}", "int64[1] {1}"))
    model = ir.serde.deserialize_model(proto)
    from kvfuse.rewriter.rules import trace_rules

    tracer = trace_rules(model, norm.RULES)
    assert apply_rules(model, norm.RULES) == {"norm/rms": 0}
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert "ReduceMean axes [1], expected the last axis [-1]" in reasons
