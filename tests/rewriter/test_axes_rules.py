"""Golden and negative tests of the `layout/*` rules (axis shuffles the dynamo exporter writes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from kvfuse.patterns import axes
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


# Falcon's multi-query `qkv[..., [-2], :]` and `qkv[..., [-1], :]` (key and value heads of a
# fused projection) as the dynamo exporter writes advanced indexing, then `.transpose(1, 2)`
SELECT = """
<ir_version: 10, opset_import: ["" : 18]>
select (float[2, 3, 6, 4] qkv) => (float[2, 1, 3, 4] k, float[2, 1, 3, 4] v) {
    heads_first = Transpose<perm = [2, 0, 1, 3]>(qkv)
    k_index = Constant<value = int64[1, 1] {-2}>()
    v_index = Constant<value = int64[1, 1] {KV_INDEX}>()
    k_head = GatherND(heads_first, k_index)
    v_head = GatherND(heads_first, v_index)
    k = Transpose<perm = [1, 0, 2, 3]>(k_head)
    v = Transpose<perm = [1, 0, 2, 3]>(v_head)
}
"""


def _model(kept: str = "t, d") -> ir.Model:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(GRAPH.replace("SHAPE_KEPT", kept)))
    ShapeInferencePass(strict_mode=False)(model)  # what the optimizer's clean-up runs first
    return model


def _run(model: ir.Model, **feeds: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_reshape_transpose_reshape_becomes_one_transpose():
    """The chain becomes Transpose(0, 1, 3, 2); same output for sizes other than traced."""
    model = _model()
    k = np.random.default_rng(0).normal(size=(2, 3, 7, 4)).astype(np.float32)
    (before,) = _run(model, k=k)
    assert apply_rules(model, axes.RULES)["layout/swap_last_axes"] == 1
    from onnxscript import optimizer

    optimizer.remove_unused_nodes(model)
    nodes = list(model.graph)
    assert [n.op_type for n in nodes] == ["Transpose"]
    assert list(nodes[0].attributes.get_ints("perm")) == [0, 1, 3, 2]
    assert nodes[0].metadata_props[RULE_TAG] == "layout/swap_last_axes"
    (after,) = _run(model, k=k)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after, k.swapaxes(-1, -2))


def test_no_rewrite_when_the_merge_does_not_keep_the_last_two_axes():
    """Reshape to [-1, D, T] then swap is a different computation: no match, and why."""
    model = _model(kept="d, t")
    tracer = trace_rules(model, axes.RULES)
    assert apply_rules(model, axes.RULES)["layout/swap_last_axes"] == 0
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert any("does not keep the last two axes" in reason for reason in reasons), reasons


def test_head_taken_by_advanced_indexing_becomes_a_slice_of_the_projection():
    """GatherND of one head after a heads-first Transpose → Transpose(Slice(qkv, axis 2)):
    no GatherND left, one Transpose per output, same values."""
    from onnxscript import optimizer

    model = ir.serde.deserialize_model(onnx.parser.parse_model(SELECT.replace("KV_INDEX", "-1")))
    ShapeInferencePass(strict_mode=False)(model)
    qkv = np.random.default_rng(0).normal(size=(2, 3, 6, 4)).astype(np.float32)
    before = _run(model, qkv=qkv)
    counts = apply_rules(model, axes.RULES)
    assert counts["layout/index_as_slice"] == 2
    assert counts["layout/select_before_transpose"] == 2
    assert counts["layout/transpose_pair"] == 2
    optimizer.remove_unused_nodes(model)
    ops = [node.op_type for node in model.graph if node.op_type != "Constant"]
    assert sorted(ops) == ["Slice", "Slice", "Transpose", "Transpose"]
    perms = [list(n.attributes.get_ints("perm")) for n in model.graph if n.op_type == "Transpose"]
    assert perms == [[0, 2, 1, 3], [0, 2, 1, 3]]
    after = _run(model, qkv=qkv)
    for expected, found in zip(before, after, strict=True):
        np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(after[0], qkv[:, :, [-2], :].transpose(0, 2, 1, 3))


def test_gather_of_several_indices_is_not_a_slice():
    """GatherND with two indices picks non-adjacent heads: no Slice, and the reason says so."""
    text = SELECT.replace("int64[1, 1] {KV_INDEX}", "int64[2, 1] {0, 5}").replace(
        "float[2, 1, 3, 4] v", "float[2, 2, 3, 4] v"
    )
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    ShapeInferencePass(strict_mode=False)(model)
    tracer = trace_rules(model, axes.RULES)
    assert apply_rules(model, axes.RULES)["layout/index_as_slice"] == 1  # only the key's
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert any("are not one constant [[i]]" in reason for reason in reasons), reasons


def test_slice_stays_after_a_transpose_that_feeds_other_ops():
    """A Transpose also read by a Mul (RoPE's x·cos) keeps its Slices after it."""
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    rope (float[2, 3, 4, 8] x) => (float[2, 4, 3, 4] half, float[2, 4, 3, 8] squared) {
        t = Transpose<perm = [0, 2, 1, 3]>(x)
        start = Constant<value = int64[1] {0}>()
        end = Constant<value = int64[1] {4}>()
        axis = Constant<value = int64[1] {3}>()
        half = Slice(t, start, end, axis)
        squared = Mul(t, t)
    }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    tracer = trace_rules(model, axes.RULES)
    assert apply_rules(model, axes.RULES)["layout/select_before_transpose"] == 0
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert any("also feeds ['Mul', 'Slice']" in reason for reason in reasons), reasons
