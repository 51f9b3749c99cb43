"""Half precision: a float32 graph rewritten to float16 (or bfloat16), some nodes kept in float32.

Every node runs in half precision except the ones named in `keep` (found by the range check,
`kvfuse.rewriter.range_check`) and the ones a lowering tagged `kvfuse.precision = float32`
(integer arithmetic done in float, such as counting a prompt's tokens, whose results must stay
exact). Precision follows the nodes, not the tensors:

    float32 value ─▶ half node        a Cast to half is inserted (one per value)
    half value    ─▶ float32 node     a Cast to float is inserted (one per value)
    weight read by both kinds         a half copy beside the float one
    graph inputs                      half (the KV buffers); `logits` stays float32

Outputs that an op defines as float whatever its input type (the mean / inverse standard
deviation of the layer norms) keep float. Values are read by their declared types; an untyped
value is left to onnxruntime's inference (a boundary missed that way fails at session creation,
so verification refuses it — it cannot pass silently).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

PRECISION_TAG = "kvfuse.precision"  # node metadata: "float32" keeps the node in float32
CAST_PREFIX = "kvfuse.precision"  # the names of the Casts this pass inserts
FLOAT_OUTPUTS = {  # (op type) → output positions that are float32 for any input type
    "SkipSimplifiedLayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}
FLOAT32_OUTPUTS = ("logits",)
HALF = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


def to_half(model: ir.Model, dtype: str = "float16", keep: frozenset[str] = frozenset()) -> dict:
    """Rewrite `model` in place to `dtype`, except the nodes named in `keep`.

    Args:
        model: a float32 graph (the lowered model).
        dtype: "float16" or "bfloat16".
        keep: names of nodes to leave in float32.

    Returns:
        Counts: nodes converted, nodes kept in float32, casts inserted, weights converted.
    """
    half, graph = HALF[dtype], model.graph
    kept = {node for node in graph if _stays_float(node, keep)}
    casts = _retype_inputs(graph, half, kept)
    weights = _convert_weights(graph, half, kept)
    converted = 0
    for node in list(graph):
        if node in kept or _inserted(node):
            continue
        converted += 1
        _retype_node(node, half)
    casts += _cast_edges(graph, half, kept)
    casts += _float_outputs(graph, half)
    return {
        "precision/half_nodes": converted,
        "precision/float32_nodes": len(kept),
        "precision/casts": casts,
        "precision/half_weights": weights,
    }


def _inserted(node: ir.Node) -> bool:
    """A Cast this pass inserted (it already has the precision it needs)."""
    return node.name.startswith(CAST_PREFIX)


def _stays_float(node: ir.Node, keep: frozenset[str]) -> bool:
    return node.name in keep or node.metadata_props.get(PRECISION_TAG) == "float32"


def _retype_inputs(graph: ir.Graph, half: ir.DataType, kept: set[ir.Node]) -> int:
    """Float graph inputs become half; a kept consumer reads them through a Cast."""
    casts = 0
    for value in graph.inputs:
        if value.dtype != ir.DataType.FLOAT:
            continue
        value.dtype = half
        readers = [(node, i) for node, i in value.uses() if node in kept]
        if readers:
            _insert_cast(graph, value, ir.DataType.FLOAT, readers)
            casts += 1
    return casts


def _convert_weights(graph: ir.Graph, half: ir.DataType, kept: set[ir.Node]) -> int:
    """Float initializers read by half nodes become half; one read by both gets a half copy."""
    converted = 0
    for value in list(graph.initializers.values()):
        if value.dtype != ir.DataType.FLOAT or value.const_value is None:
            continue
        readers = [(node, i) for node, i in value.uses() if node not in kept]
        if not readers:
            continue
        array = value.const_value.numpy().astype(_numpy_dtype(half))
        if len(readers) == len(value.uses()):
            value.const_value = ir.tensor(array, dtype=half, name=value.name)
            value.dtype = half
        else:
            copy = ir.Value(name=f"{value.name}.half", shape=value.shape, type=ir.TensorType(half))
            copy.const_value = ir.tensor(array, dtype=half, name=copy.name)
            graph.register_initializer(copy)
            for node, i in readers:
                node.replace_input_with(i, copy)
        converted += 1
    return converted


def _numpy_dtype(half: ir.DataType):
    if half == ir.DataType.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float16


def _retype_node(node: ir.Node, half: ir.DataType) -> None:
    """A half node: its float outputs, Cast targets and constants become half."""
    if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", half)
    if node.op_type == "Constant" and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
        if tensor.dtype == ir.DataType.FLOAT:
            array = tensor.numpy().astype(_numpy_dtype(half))
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, dtype=half))
    float_only = FLOAT_OUTPUTS.get(node.op_type, ())
    for index, output in enumerate(node.outputs):
        if output.dtype == ir.DataType.FLOAT and index not in float_only:
            output.dtype = half


def _cast_edges(graph: ir.Graph, half: ir.DataType, kept: set[ir.Node]) -> int:
    """Where a value's precision differs from its reader's, read it through a Cast."""
    casts = 0
    for node in list(graph):
        if _inserted(node):
            continue
        producer_kept = node in kept
        float_only = FLOAT_OUTPUTS.get(node.op_type, ())
        for index, value in enumerate(node.outputs):
            if index in float_only or value.dtype not in (ir.DataType.FLOAT, half):
                continue
            readers = [(user, i) for user, i in value.uses() if (user in kept) != producer_kept]
            readers = [(u, i) for u, i in readers if not _inserted(u)]
            if readers:
                _insert_cast(graph, value, half if producer_kept else ir.DataType.FLOAT, readers)
                casts += 1
    return casts


def _float_outputs(graph: ir.Graph, half: ir.DataType) -> int:
    """Graph outputs that stay float32 (`logits`): a last Cast takes over their name."""
    casts = 0
    for position, value in enumerate(list(graph.outputs)):
        if value.name not in FLOAT32_OUTPUTS or value.dtype != half:
            continue
        name = value.name
        value.name = f"{name}.half"
        cast = ir.node(
            "Cast", [value], attributes={"to": ir.DataType.FLOAT}, name=f"{CAST_PREFIX}/logits"
        )
        cast.outputs[0].name, cast.outputs[0].shape = name, value.shape
        cast.outputs[0].dtype = ir.DataType.FLOAT
        graph.append(cast)
        graph.outputs[position] = cast.outputs[0]
        casts += 1
    return casts


def _insert_cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, readers) -> None:
    name = "to_float" if to == ir.DataType.FLOAT else "to_half"
    cast = ir.node(
        "Cast", [value], attributes={"to": to}, name=f"{CAST_PREFIX}/{value.name}/{name}"
    )
    cast.outputs[0].name, cast.outputs[0].shape = f"{value.name}.{name}", value.shape
    cast.outputs[0].dtype = to
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), cast)
    else:
        graph.insert_after(producer, cast)
    for node, i in readers:
        node.replace_input_with(i, cast.outputs[0])
