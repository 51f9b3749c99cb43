"""Three projections of one hidden state into Q, K and V → one MatMul and a Split.

    x ─ MatMul(Wq) [+bq] ─┐
    x ─ MatMul(Wk) [+bk] ─ CachedAttention
    x ─ MatMul(Wv) [+bv] ─┘
                     →   x ─ MatMul([Wq|Wk|Wv]) [+[bq|bk|bv]] ─ Split ─ (q, k, v) ─ CachedAttention

At decode one GEMV per layer instead of three (the same weight bytes, a third of the kernel
launches). Runs on the fused representation, before lowering, so every target gets it: the
`ort` lowering hands the Split's input to GroupQueryAttention as its packed query, the `onnx`
lowering reads the three Split outputs. Biases (Qwen2) are packed the same way.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from kvfuse.rewriter.rules import (
    KVFUSE_DOMAIN,
    REPLACED_TAG,
    RULE_TAG,
    add_initializer,
    replaced_by,
)

RULE = "fuse/packed_qkv"


def pack_qkv_projections(model: ir.Model) -> dict[str, int]:
    """Pack the Q/K/V projections of every CachedAttention that has three separate ones."""
    graph, packed = model.graph, 0
    for attention in [
        n for n in graph if n.domain == KVFUSE_DOMAIN and n.op_type == "CachedAttention"
    ]:
        projections = [_projection(value) for value in attention.inputs[:3]]
        if None in projections or len({p[0] for p in projections}) != 1:
            continue
        biases = [p[2] for p in projections]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            continue
        _pack(graph, attention, projections)
        packed += 1
    return {RULE: packed}


def _pack(graph: ir.Graph, attention: ir.Node, projections) -> None:
    hidden = projections[0][0]
    weights = [p[1].const_value.numpy() for p in projections]
    widths = [w.shape[1] for w in weights]
    name = f"{attention.name}/packed_qkv"
    fused = add_initializer(graph, f"{name}.weight", np.concatenate(weights, axis=1))
    nodes = [ir.node("MatMul", [hidden, fused], name=f"{name}/MatMul")]
    output = nodes[-1].outputs[0]
    if projections[0][2] is not None:
        biases = np.concatenate([p[2].const_value.numpy() for p in projections])
        nodes.append(ir.node("Add", [output, add_initializer(graph, f"{name}.bias", biases)]))
        output = nodes[-1].outputs[0]
    query = attention.inputs[0]
    output.dtype = query.dtype
    if query.shape is not None:
        output.shape = ir.Shape([*query.shape[:-1], sum(widths)])
    sizes = add_initializer(graph, f"{name}.split", np.array(widths, dtype=np.int64))
    split = ir.node("Split", [output, sizes], attributes={"axis": -1}, num_outputs=3)
    nodes.append(split)
    replaced = [entry for p in projections for node in p[3] for entry in replaced_by(node)]
    for node in nodes:
        node.metadata_props[RULE_TAG] = RULE
        node.metadata_props[REPLACED_TAG] = json.dumps(replaced)
    graph.insert_before(attention, nodes)
    for index, part in enumerate(split.outputs):
        old = attention.inputs[index]
        part.dtype, part.shape = old.dtype, old.shape
        attention.replace_input_with(index, part)


def _projection(value: ir.Value | None):
    """(hidden, weight, bias, nodes) if `value` = MatMul(hidden, W) [+ b] with a constant 2-D
    W (and b); else None. K and V are still read by the Concat chains that feed the `present`
    outputs until the retained-state conversion replaces them; the unpacked projections die
    with those chains."""
    if value is None or value.is_graph_output():
        return None
    node, bias = value.producer(), None
    nodes = [node]
    if node is not None and node.op_type == "Add":
        bias = next((v for v in node.inputs if v.const_value is not None), None)
        rest = [v for v in node.inputs if v is not bias]
        if bias is None or len(rest) != 1:
            return None
        node = rest[0].producer()
        nodes.append(node)
    if node is None or node.op_type != "MatMul" or node.inputs[1].const_value is None:
        return None
    if node.inputs[1].const_value.numpy().ndim != 2:
        return None
    return node.inputs[0], node.inputs[1], bias, nodes
