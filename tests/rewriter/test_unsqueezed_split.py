"""A fused projection split after a head Unsqueeze (GPTBigCode's multi-query c_attn) is split
first and each part reshaped into heads; outputs unchanged; other Unsqueezes left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kvfuse.rewriter.unsqueezed_split import split_unsqueezed_projections

H, D = 4, 8


def _graph(axis: int) -> onnx.ModelProto:
    """x [B, S, (H + 2)·D] ─ Unsqueeze(axis) ─ Split(axis 3) → q reshaped [B, S, H, D], k, v."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["grid"]),
        helper.make_node("Split", ["grid", "sizes"], ["q4", "k", "v"], axis=3),
        helper.make_node("Reshape", ["q4", "q_shape"], ["q"], allowzero=1),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([axis], np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array([H * D, D, D], np.int64), "sizes"),
        onnx.numpy_helper.from_array(np.array([2, 3, H, D], np.int64), "q_shape"),
    ]
    part = [2, 1, 3, D] if axis == 1 else [2, 3, 1, D]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, (H + 2) * D])],
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 3, H, D]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, part),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, part),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {"x": x})


def test_split_moves_before_the_head_axis():
    """Split reads the flat projection; the query's Reshape reads its part directly; K and V
    become Reshape [B, S, 1, D] + Transpose; every output equal."""
    original = _graph(axis=1)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(original))
    counts = split_unsqueezed_projections(model)
    assert counts == {"shape/unsqueezed_split": 1}
    from onnxscript import optimizer

    optimizer.remove_unused_nodes(model)
    ops = [n.op_type for n in model.graph]
    assert "Unsqueeze" not in ops and ops.count("Transpose") == 2
    split = next(n for n in model.graph if n.op_type == "Split")
    assert split.inputs[0].name == "x" and split.attributes.get_int("axis") == 2
    x = np.random.default_rng(0).normal(size=(2, 3, (H + 2) * D)).astype(np.float32)
    for before, after in zip(
        _run(original, x), _run(ir.serde.serialize_model(model), x), strict=True
    ):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("axis", [2])
def test_other_unsqueezes_are_left_alone(axis):
    """An Unsqueeze on another axis is no head axis of a projection: nothing changes."""
    model = ir.serde.deserialize_model(_graph(axis=axis))
    assert split_unsqueezed_projections(model) == {"shape/unsqueezed_split": 0}
    assert [n.op_type for n in model.graph] == ["Unsqueeze", "Split", "Reshape"]
