"""The shape probe names a measured dim only by what it follows: the new tokens, or nothing
when it grows with the past as well (a total length, equal to the new tokens at a prompt's
first step — Gemma 2's Optimum mask builder)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from kvfuse.rewriter.shape_probe import probe_position_shapes

# key positions 0..P+S-1 and query positions 0..S-1, from the shapes of the past and the ids
GRAPH = """
<ir_version: 10, opset_import: ["" : 18]>
positions (int64[batch_size, sequence_length] input_ids,
           float[batch_size, 2, past_sequence_length, 16] past) => (int64[1] t, int64[1] s) {
    zero = Constant<value = int64 {0}>()
    one = Constant<value = int64 {1}>()
    two = Constant<value = int64 {2}>()
    ids_dims = Shape(input_ids)
    new = Gather(ids_dims, one)
    past_dims = Shape(past)
    cached = Gather(past_dims, two)
    total = Add(cached, new)
    keys = Range(zero, total, one)
    queries = Range(zero, new, one)
    t = Shape(keys)
    s = Shape(queries)
}
"""


def _dims(value: ir.Value) -> list:
    return [d if isinstance(d, int) else d.value for d in value.shape]


def test_a_total_length_is_not_named_the_new_tokens():
    """Key positions (P + S) stay unnamed; query positions (S) are `sequence_length`."""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(GRAPH))
    ShapeInferencePass(strict_mode=False)(model)
    values = {node.outputs[0].name: node.outputs[0] for node in model.graph}
    assert probe_position_shapes(model) == {"shape/probed": 2}
    assert _dims(values["queries"]) == ["sequence_length"]
    assert _dims(values["keys"]) == [None]
