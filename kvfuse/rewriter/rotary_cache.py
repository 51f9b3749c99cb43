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
from kvfuse.rewriter.rules import KVFUSE_DOMAIN
from kvfuse.rewriter.widen import widen_bfloat16


def evaluate_rotary_tables(
    graph: ir.Graph, cos: ir.Value, sin: ir.Value, max_context: int
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin as [max_context, D] float32 tables, evaluated from the graph's own builder
    as at the first step of a `max_context`-token prompt (see `evaluate_at_prompt`)."""
    cos_table, sin_table = evaluate_at_prompt(graph, [cos, sin], max_context)
    return _as_table(cos_table, max_context, cos), _as_table(sin_table, max_context, sin)


def evaluate_at_prompt(
    graph: ir.Graph, outputs: list[ir.Value], new_tokens: int, rows: int = 1, past: int = 0
) -> list[np.ndarray]:
    """`outputs` as at the first step of a prompt of `new_tokens` tokens in `rows` rows (or,
    with `past` > 0, as after `past` cached positions, for shape-only readers: the positions
    fed stay 0..new_tokens-1).

    They may read `position_ids`' values (0..new_tokens-1 per row: Llama's cos/sin computed or
    gathered from them) and any tensor's shape or dtype only (Gemma's Optimum export builds
    the positions from Shape(past key) and Shape(embeddings); other builders cast to the
    hidden state's dtype): such tensors are replaced by zeros of their first-step shape, so the
    model itself never runs. Values of any other input are refused (`KvfuseError`)."""
    nodes, data_inputs, stand_ins = _ancestors(outputs)
    other = sorted(name for name in data_inputs if name != POSITIONS)
    if other:
        raise KvfuseError(
            f"RoPE cos/sin are computed from the values of {other}, not only from position_ids "
            "(or tensor shapes); this exporter's rotary builder is not supported"
        )
    dims = _prompt_dims(graph, new_tokens, rows)
    feeds = {name: _zeros(value, dims, past) for name, value in stand_ins.items()}
    if POSITIONS in data_inputs:
        positions = data_inputs[POSITIONS]
        batch = positions.shape[0] if positions.shape else 1
        batch = batch if isinstance(batch, int) else dims.get(_dim_name(positions, 0), rows)
        feeds[POSITIONS] = np.tile(np.arange(new_tokens, dtype=np.int64), (batch, 1))
    return _run(nodes, [*data_inputs.values(), *stand_ins.values()], outputs, feeds)


POSITIONS = "position_ids"


def _prompt_dims(graph: ir.Graph, new_tokens: int, rows: int) -> dict[str, int]:
    """Sizes of the named dims at the first step of a prompt: the batch (input_ids' first dim)
    holds `rows` rows (its static size if fixed), the new tokens are `new_tokens`; any other
    named dim (a past length) is 0."""
    ids = next((v for v in graph.inputs if v.name in ("input_ids", POSITIONS)), None)
    batch, new = (_dim_name(ids, 0), _dim_name(ids, 1)) if ids is not None else (None, None)
    return {name: size for name, size in ((batch, rows), (new, new_tokens)) if name is not None}


def _dim_name(value: ir.Value, axis: int) -> str | None:
    if value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape[axis]
    return dim.value if isinstance(dim, ir.SymbolicDim) else None


def _zeros(value: ir.Value, dims: dict[str, int], past: int = 0) -> np.ndarray:
    """Zeros shaped as `value` at the first prompt step: a named dim's size from `dims` (any
    other name, a past length, is `past`), a sum of named dims (`past_sequence_length +
    sequence_length`) the sum of their sizes."""
    shape = []
    for dim in value.shape:
        if isinstance(dim, int):
            shape.append(dim)
            continue
        terms = [t.strip() for t in str(dim.value or "").split("+")]
        shape.append(sum(int(t) if t.isdigit() else dims.get(t, past) for t in terms))
    return np.zeros(shape, dtype=value.dtype.numpy())


# inputs an op reads for their shape or type only: (op_type, input index)
_METADATA_READS = {("Shape", 0), ("Size", 0), ("CastLike", 1)}


def _ancestors(outputs: list[ir.Value]):
    """Nodes computing `outputs` (in graph order), the graph inputs whose values they read, and
    the tensors they read only for shape or dtype (with a known rank: fed as stand-ins)."""
    seen_nodes: set[ir.Node] = set()
    data_inputs: dict[str, ir.Value] = {}
    metadata: dict[str, ir.Value] = {}
    stack = [(value, False) for value in outputs]
    while stack:
        value, shape_only = stack.pop()
        if shape_only and value.shape is not None and value.const_value is None:
            metadata[value.name] = value
            continue
        node = value.producer()
        if node is None:
            if value.is_graph_input():
                data_inputs[value.name] = value
            continue
        if node in seen_nodes:
            continue
        seen_nodes.add(node)
        for index, parent in enumerate(node.inputs):
            if parent is not None:
                stack.append((parent, (node.op_type, index) in _METADATA_READS))
    stand_ins = {
        name: v
        for name, v in metadata.items()
        if name not in data_inputs and v.producer() not in seen_nodes  # else computed anyway
    }
    ordered = [node for node in outputs[0].graph if node in seen_nodes]
    # a stand-in is fed, never computed: drop the nodes only it needed
    needed = _needed(ordered, outputs, set(stand_ins))
    return needed, data_inputs, stand_ins


def _needed(nodes: list[ir.Node], outputs: list[ir.Value], fed: set[str]) -> list[ir.Node]:
    """The nodes of `nodes` that `outputs` need when the values named in `fed` are given."""
    wanted = {v.name for v in outputs}
    keep = []
    for node in reversed(nodes):
        if any(o.name in wanted and o.name not in fed for o in node.outputs):
            keep.append(node)
            wanted.update(value.name for value in node.inputs if value is not None)
    return keep[::-1]


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


def _run(nodes, inputs, outputs, feeds) -> list[np.ndarray]:
    initializers = {}
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.is_initializer():
                # inline (a tensor kept in the model's external data file has no file here)
                inline = ir.Tensor(value.const_value.numpy(), name=value.name)
                initializers[value.name] = ir.serde.serialize_tensor(inline)
                initializers[value.name].name = value.name
    graph = onnx.helper.make_graph(
        [proto for node in nodes for proto in _standard(node)],
        "rotary_builder",
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in inputs],
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in outputs],
        initializer=list(initializers.values()),
    )
    opset = outputs[0].graph.opset_imports.get("", 18)
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10
    )
    model, feeds = _runnable(model, feeds)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure comes back as the exception below
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)
    except Exception as error:  # onnxruntime's errors share no base class but Exception
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KvfuseError(
            f"the model's RoPE table builder does not run in onnxruntime "
            f"({reason.split(' : ')[-1][:200]}); re-export the model"
        ) from error


def _runnable(model: onnx.ModelProto, feeds: dict) -> tuple[onnx.ModelProto, dict]:
    """The builder as onnxruntime's CPU provider can run it: a bfloat16 one widened to float32
    (no bf16 Mul/Cos kernels there). Its tables are rounded to the model's type where they are
    baked, as the model's own final Cast to bfloat16 rounds them."""
    widened = ir.serde.deserialize_model(model)
    if not widen_bfloat16(widened):
        return model, feeds
    feeds = {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in feeds.items()}
    return ir.serde.serialize_model(widened), feeds


def _standard(node: ir.Node) -> list[onnx.NodeProto]:
    """`node` in standard ops: the fusion may have rewritten part of the builder into kvfuse
    ops (GPT-J's tables are repeated per pair with the head-repeat structure, which becomes
    RepeatKV) that onnxruntime cannot run."""
    if node.domain != KVFUSE_DOMAIN:
        return [_inline_constants(node)]
    if node.op_type != "RepeatKV":
        raise KvfuseError(
            f"the RoPE cos/sin builder contains kvfuse's own {node.op_type} ({node.name}); "
            "kvfuse cannot evaluate it to bake the RoPE tables"
        )
    # RepeatKV(x; repeats n, axis a): each element of axis a repeated n times in a row
    x, y = node.inputs[0].name, node.outputs[0].name
    axis, repeats = node.attributes.get_int("axis"), node.attributes.get_int("repeats")
    rank = len(node.inputs[0].shape)
    tiles = [1] * (rank + 1)
    tiles[axis + 1] = repeats
    make, tag = onnx.helper.make_node, f"{y}/kvfuse_standard"
    return [
        make("Constant", [], [f"{tag}/axes"], value=_int_tensor([axis + 1])),
        make("Unsqueeze", [x, f"{tag}/axes"], [f"{tag}/u"]),
        make("Constant", [], [f"{tag}/tiles"], value=_int_tensor(tiles)),
        make("Tile", [f"{tag}/u", f"{tag}/tiles"], [f"{tag}/t"]),
        make("Shape", [x], [f"{tag}/shape"]),
        make("Constant", [], [f"{tag}/scale"], value=_int_tensor([1] * rank)),
        make("Constant", [], [f"{tag}/index"], value=_int_tensor([axis])),
        make("Constant", [], [f"{tag}/n"], value=_int_tensor([repeats])),
        make("ScatterElements", [f"{tag}/scale", f"{tag}/index", f"{tag}/n"], [f"{tag}/s"]),
        make("Mul", [f"{tag}/shape", f"{tag}/s"], [f"{tag}/target"]),
        make("Reshape", [f"{tag}/t", f"{tag}/target"], [y]),
    ]


def _inline_constants(node: ir.Node) -> onnx.NodeProto:
    """`node` serialized with its tensor attributes inline: Optimum's > 2 GB exports keep
    Constants over 1 KiB in the external file, which a graph built from bytes cannot read."""
    proto = ir.serde.serialize_node(node)
    for attribute in proto.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.external_data:
            tensor = node.attributes[attribute.name].value
            inline = ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), name=tensor.name))
            attribute.t.CopyFrom(inline)
    return proto


def _int_tensor(values: list[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(values, dtype=np.int64))


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
    return np.ascontiguousarray(by_position[:, 0, :].astype(np.float32))
