"""Golden tests of the transposed-weight lowering (a tied LM head reads its table transposed)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvfuse.patterns import lower_onnx, lower_ort
from kvfuse.rewriter.rules import apply_rules, trace_rules
from tests.rewriter.test_norm_rule import run

# the head of a model with tied embeddings, as Optimum exports it: MatMul(h, Transpose(E))
GRAPH = """
<ir_version: 10, opset_import: ["" : 18]>
head (float[BATCH, 1, 8] h) => (float[BATCH, 1, 16] logits) {
    table_t = Transpose<perm = [1, 0]>(table)
    logits = MatMul(h, table_t)
}
"""


def _model(graph: str = GRAPH) -> tuple[onnx.ModelProto, dict]:
    proto = onnx.parser.parse_model(graph)
    table = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(table, "table"))
    feeds = {"h": np.random.default_rng(1).normal(size=(3, 1, 8)).astype(np.float32)}
    return proto, feeds


@pytest.mark.parametrize(
    "rules, opset, fused",
    [
        (lower_ort.WEIGHT_RULES, {"com.microsoft": 1}, "FusedMatMul"),
        (lower_onnx.WEIGHT_RULES, {}, "Gemm"),
    ],
)
def test_transpose_of_a_constant_table_is_read_in_place(rules, opset, fused):
    """One rewrite per target; no Transpose left (nothing for onnxruntime to fold into a
    second copy of the table); same logits."""
    proto, feeds = _model()
    before = run(proto, feeds)
    model = ir.serde.deserialize_model(proto)
    assert sum(apply_rules(model, rules).values()) == 1
    from onnxscript import optimizer

    optimizer.remove_unused_nodes(model)
    ops = [node.op_type for node in model.graph]
    assert fused in ops and "Transpose" not in ops and "MatMul" not in ops
    model.opset_imports.update(opset)
    after = run(ir.serde.serialize_model(model), feeds)
    np.testing.assert_allclose(after[0], before[0], atol=1e-5, rtol=1e-5)


def test_a_computed_operand_is_not_a_weight():
    """Transposing a tensor computed at run time is not a stored weight: no rewrite, and the
    reason says so."""
    graph = GRAPH.replace("(float[BATCH, 1, 8] h)", "(float[BATCH, 1, 8] h, float[16, 8] table)")
    model = ir.serde.deserialize_model(onnx.parser.parse_model(graph))
    tracer = trace_rules(model, lower_ort.WEIGHT_RULES)
    assert apply_rules(model, lower_ort.WEIGHT_RULES) == {"lower/transposed_weight": 0}
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert "the transposed operand is computed, not a constant weight" in reasons


def test_gemm_needs_a_shape_it_can_restore():
    """Gemm is 2-D: with two unknown leading dims the result cannot be reshaped back."""
    graph = GRAPH.replace("float[BATCH, 1, 8] h", "float[BATCH, SEQ, 8] h").replace(
        "float[BATCH, 1, 16] logits", "float[BATCH, SEQ, 16] logits"
    )
    proto, _ = _model(graph)
    model = ir.serde.deserialize_model(proto)
    tracer = trace_rules(model, lower_onnx.WEIGHT_RULES)
    assert apply_rules(model, lower_onnx.WEIGHT_RULES) == {"lower/transposed_weight_gemm": 0}
    reasons = [miss.reason for miss in tracer.attempts.values()]
    assert any("Gemm needs at most one unknown dim" in r for r in reasons), reasons
