"""The float16 pass on a tiny graph: kept nodes read and write float32 through Casts."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kvfuse.rewriter.precision import to_half


def _graph() -> onnx.ModelProto:
    """y = (x·W1 + b)·W2, logits an output: the shape of an MLP with a bias."""
    rng = np.random.default_rng(0)
    weights = {
        "W1": rng.normal(size=(8, 16)).astype(np.float32),
        "b": rng.normal(size=(16,)).astype(np.float32),
        "W2": rng.normal(size=(16, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("MatMul", ["hb", "W2"], ["logits"], name="second"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_kept_node_stays_float32_between_casts():
    """Keeping `bias`: Cast to float before it, Cast to half after it, its bias weight float32,
    the MatMul weights float16; inputs half, `logits` float32; outputs within float16's error."""
    proto = onnx.shape_inference.infer_shapes(_graph())  # the pass reads each value's type
    model = ir.serde.deserialize_model(proto)
    counts = to_half(model, keep=frozenset({"bias"}))
    half = ir.serde.serialize_model(model)
    onnx.checker.check_model(half, full_check=True)
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types == {"W1": TensorProto.FLOAT16, "b": TensorProto.FLOAT, "W2": TensorProto.FLOAT16}
    ops = [n.op_type for n in half.graph.node]
    assert ops.count("Cast") == 3  # h to float, hb back to half, logits to float
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert counts["precision/float32_nodes"] == 1 and counts["precision/half_nodes"] == 2
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    expected = _run(proto, x)
    found = _run(half, x.astype(np.float16))
    assert found.dtype == np.float32
    np.testing.assert_allclose(found, expected, atol=0.05, rtol=0.01)
