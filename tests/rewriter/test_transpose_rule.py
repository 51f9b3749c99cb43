"""Golden and negative tests of `layout/swap_last_axes` (the dynamo exporter's key transpose)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from kvfuse.patterns import transpose
from kvfuse.rewriter.rules import RULE_TAG, apply_rules, trace_rules

# k.transpose(-2, -1) as torch.onnx's dynamo exporter writes it inside SDPA: merge the leading
# axes, swap the last two in 3-D, split the leading axes back; targets read from Shape(k)
GRAPH = """
<ir_version: 10, opset_import: ["" : 18]>
swap (float[batch, 3, past, 4] k) => (float[batch, 3, 4, past] y) {
    dims = Shape(k)
    last = Constant<value = int64[1] {-1}>()
    second_last = Constant<value = int64[1] {-2}>()
    end = Constant<value = int64[1] {9223372036854775807}>()
    begin = Constant<value = int64[1] {-9223372036854775808}>()
    d = Slice(dims, last, end)
    t = Slice(dims, second_last, last)
    leading = Slice(dims, begin, second_last)
    merged_shape = Concat<axis = 0>(last, SHAPE_KEPT)
    merged = Reshape(k, merged_shape)
    swapped = Transpose<perm = [0, 2, 1]>(merged)
    split_shape = Concat<axis = 0>(leading, d, t)
    y = Reshape(swapped, split_shape)
}
"""


def _model(kept: str = "t, d") -> ir.Model:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(GRAPH.replace("SHAPE_KEPT", kept)))
    ShapeInferencePass(strict_mode=False)(model)  # what the optimizer's clean-up runs first
    return model


def _run(model: ir.Model, k: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"k": k})[0]


def test_reshape_transpose_reshape_becomes_one_transpose():
    """The chain becomes Transpose(0, 1, 3, 2); same output for sizes other than traced."""
    model = _model()
    k = np.random.default_rng(0).normal(size=(2, 3, 7, 4)).astype(np.float32)
    before = _run(model, k)
    assert apply_rules(model, transpose.RULES) == {"layout/swap_last_axes": 1}
    from onnxscript import optimizer

    optimizer.remove_unused_nodes(model)
    nodes = list(model.graph)
    assert [n.op_type for n in nodes] == ["Transpose"]
    assert list(nodes[0].attributes.get_ints("perm")) == [0, 1, 3, 2]
    assert nodes[0].metadata_props[RULE_TAG] == "layout/swap_last_axes"
    after = _run(model, k)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after, k.swapaxes(-1, -2))


def test_no_rewrite_when_the_merge_does_not_keep_the_last_two_axes():
    """Reshape to [-1, D, T] then swap is a different computation: no match, and why."""
    model = _model(kept="d, t")
    tracer = trace_rules(model, transpose.RULES)
    assert apply_rules(model, transpose.RULES) == {"layout/swap_last_axes": 0}
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert any("does not keep the last two axes" in reason for reason in reasons), reasons
