"""Recover a model's RoPE tables by running its own cos/sin builder for every position.

Exporters compute cos and sin in the graph from `position_ids` (and the inverse frequencies,
stored as a constant). Rather than pattern-match that builder, which differs per exporter and
per RoPE scaling scheme, the subgraph that produces `cos`/`sin` is cut out and evaluated for
positions 0..max_context-1: whatever scaling the model applies is reproduced exactly. The
builder then has no consumers left and is removed with the other dead nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from kvfuse.errors import KvfuseError


def evaluate_rotary_tables(
    graph: ir.Graph, cos: ir.Value, sin: ir.Value, max_context: int
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin as [max_context, D] float32 tables, evaluated from the graph's own builder."""
    nodes, inputs = _ancestors([cos, sin])
    by_name = {value.name: value for value in inputs}
    shape_only = {name for name, value in by_name.items() if _read_only_by_shape(value, nodes)}
    if "position_ids" not in by_name or set(by_name) - shape_only != {"position_ids"}:
        raise KvfuseError(
            f"RoPE cos/sin depend on {sorted(by_name) or 'no input'}, expected only "
            "position_ids; this exporter's rotary builder is not supported"
        )
    positions = by_name["position_ids"]
    rows = positions.shape[0] if positions.shape is not None else 1
    rows = rows if isinstance(rows, int) else 1  # a static batch needs that many rows
    feeds = {"position_ids": np.tile(np.arange(max_context, dtype=np.int64), (rows, 1))}
    feeds |= {name: _shape_stand_in(by_name[name], positions, rows) for name in shape_only}
    cos_table, sin_table = _run(nodes, inputs, [cos, sin], feeds)
    return _as_table(cos_table, max_context, cos), _as_table(sin_table, max_context, sin)


def half_tables(
    cos: np.ndarray, sin: np.ndarray, interleaved: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The [T, R/2] caches a fused kernel takes: one value per rotated pair. Rotate-half
    tables repeat their first half; interleaved tables repeat each value twice in a row."""
    if interleaved:
        parts = (cos[:, 0::2], cos[:, 1::2], sin[:, 0::2], sin[:, 1::2])
    else:
        half = cos.shape[1] // 2
        parts = (cos[:, :half], cos[:, half:], sin[:, :half], sin[:, half:])
    if not (np.array_equal(parts[0], parts[1]) and np.array_equal(parts[2], parts[3])):
        style = "interleaved" if interleaved else "rotate-half"
        raise KvfuseError(f"RoPE tables do not repeat per pair as {style} RoPE needs")
    return np.ascontiguousarray(parts[0]), np.ascontiguousarray(parts[2])


def _read_only_by_shape(value: ir.Value, nodes: list[ir.Node]) -> bool:
    """Whether the builder reads `value` only through Shape: the dynamo exporter takes the
    batch size from whichever input has it (e.g. a past KV input), not from position_ids."""
    users = [user for user, _ in value.uses() if user in nodes]
    return bool(users) and all(user.op_type == "Shape" for user in users)


def _shape_stand_in(value: ir.Value, positions: ir.Value, rows: int) -> np.ndarray:
    """Zeros of the input's shape as at the first step: the batch dim (the one named like
    position_ids' first dim) has `rows` rows, any other symbolic dim (a past length) is 0."""
    batch = positions.shape[0] if positions.shape is not None else None
    dims = [d if isinstance(d, int) else rows if d == batch else 0 for d in value.shape or []]
    return np.zeros(dims, dtype=value.dtype.numpy())


def _ancestors(outputs: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    """Nodes computing `outputs` (in graph order) and the graph inputs they read."""
    seen_nodes: set[ir.Node] = set()
    graph_inputs: dict[str, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            if value.is_graph_input():
                graph_inputs[value.name] = value
            continue
        if node in seen_nodes:
            continue
        seen_nodes.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    graph = outputs[0].graph
    ordered = [node for node in graph if node in seen_nodes]
    return ordered, list(graph_inputs.values())


def _run(nodes, inputs, outputs, feeds, dtype=None) -> list[np.ndarray]:
    initializers = {}
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.is_initializer():
                initializers[value.name] = ir.serde.serialize_tensor(value.const_value)
                initializers[value.name].name = value.name
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes],
        "rotary_builder",
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in inputs],
        [
            onnx.helper.make_tensor_value_info(v.name, (dtype or ir.DataType.FLOAT).value, None)
            for v in outputs
        ],
        initializer=list(initializers.values()),
    )
    opset = outputs[0].graph.opset_imports.get("", 18)
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _as_table(array: np.ndarray, max_context: int, value: ir.Value) -> np.ndarray:
    """[T, D] from a table broadcast for any layout ([B,1,T,D], [T,B,1,D], ...): every batch
    row holds the same positions, so row 0 is the table."""
    axes = [i for i, d in enumerate(array.shape[:-1]) if d == max_context]
    if not axes:
        raise KvfuseError(
            f"RoPE table {value.name} evaluates to shape {list(array.shape)}, "
            f"expected one axis of {max_context} positions and the rotary dim last"
        )
    by_position = np.moveaxis(array, axes[-1], 0).reshape(max_context, -1, array.shape[-1])
    return np.ascontiguousarray(by_position[:, 0, :], dtype=np.float32)
