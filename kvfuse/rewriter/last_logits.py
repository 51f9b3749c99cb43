"""Compute logits only where they are needed: one position per row instead of all S.

Prefill of 512 tokens through SmolLM2's 49,152-word head is 14.5 GFLOP and 100 MB of logits,
of which generation reads one row. The position each row needs is derived from the inputs the
retained-state graph already has:

    index[b] = min(seqlens_k[b], S − 1)

which is the row's last real token in a (right-padded) first prompt, the last token of a
prefill chunk (whose end is the row's last valid position), and 0 in a decode step. The
hidden state at that index is gathered before the output projection: `logits` becomes
[B, 1, vocab].

On a GPU the step is replayed as a CUDA graph, which onnxruntime allows only when no node
copies between host and device. `Shape(input_ids)` lives on the host, so there S − 1 is
counted on the device instead: ReduceSum over a row of ones made from `input_ids`, in float32
(exact to 2^24 tokens; these nodes are tagged to stay float32 in a half-precision graph).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvfuse.rewriter.precision import PRECISION_TAG
from kvfuse.rewriter.retained_state import SEQLENS
from kvfuse.rewriter.rules import RULE_TAG


def gather_last_logits(model: ir.Model, on_device: bool = False) -> dict[str, int]:
    """Insert the gather before the MatMul that produces `logits` from a [B, S, E] hidden
    state; returns {rule: 1}, or {rule: 0} (logits left whole) when the output projection
    is shaped otherwise (e.g. a sequence-first model transposes after it). `on_device`
    computes the index with no host-side shape op (for CUDA graphs)."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    head = logits.producer() if logits is not None else None
    if head is None or head.op_type != "MatMul" or head.inputs[0].shape is None:
        return {"logits/last_position": 0}
    hidden = head.inputs[0]
    width = hidden.shape[-1]
    if len(hidden.shape) != 3 or not isinstance(width, int):
        return {"logits/last_position": 0}
    inputs = {v.name: v for v in graph.inputs}
    nodes, index = _device_index_nodes(inputs) if on_device else _index_nodes(inputs)
    shape = _const(nodes, np.array([1, 1, width], np.int64))
    index3 = _add(nodes, "Unsqueeze", [index, _const(nodes, np.array([1, 2], np.int64))])
    expanded = _add(nodes, "Expand", [index3, shape])
    last = _add(nodes, "GatherElements", [hidden, expanded], axis=1)
    for node in nodes:
        node.metadata_props[RULE_TAG] = "logits/last_position"
        graph.insert_before(head, node)
    head.replace_input_with(0, last)
    batch = logits.shape[0] if logits.shape is not None else "batch_size"
    vocab = logits.shape[-1] if logits.shape is not None else None
    last.shape, last.dtype = ir.Shape([hidden.shape[0], 1, width]), hidden.dtype
    logits.shape = ir.Shape([batch, 1, vocab])
    return {"logits/last_position": 1}


def _index_nodes(inputs: dict[str, ir.Value]):
    """index = min(seqlens_k, S − 1), int64 [B]."""
    nodes: list[ir.Node] = []
    seqlens = _add(nodes, "Cast", [inputs[SEQLENS]], to=ir.DataType.INT64)
    new_tokens = _add(nodes, "Shape", [inputs["input_ids"]], start=1, end=2)
    last = _add(nodes, "Sub", [new_tokens, _const(nodes, np.array([1], np.int64))])
    return nodes, _add(nodes, "Min", [seqlens, last])


def _device_index_nodes(inputs: dict[str, ir.Value]):
    """index = min(seqlens_k, S − 1), int64 [B], with S counted on the device."""
    nodes: list[ir.Node] = []
    ids = _add(nodes, "Cast", [inputs["input_ids"]], to=ir.DataType.FLOAT)
    zero, one = (_const(nodes, np.array(v, np.float32)) for v in (0.0, 1.0))
    ones = _add(nodes, "Add", [_add(nodes, "Mul", [ids, zero]), one])
    count = _add(nodes, "ReduceSum", [ones, _const(nodes, np.array([1], np.int64))], keepdims=0)
    last = _add(nodes, "Sub", [_add(nodes, "Cast", [count], to=ir.DataType.INT64), _int(nodes)])
    seqlens = _add(nodes, "Cast", [inputs[SEQLENS]], to=ir.DataType.INT64)
    for node in nodes:
        node.metadata_props[PRECISION_TAG] = "float32"
    return nodes, _add(nodes, "Min", [seqlens, last])


def _int(nodes: list[ir.Node]) -> ir.Value:
    return _const(nodes, np.array(1, np.int64))


def _add(nodes: list[ir.Node], op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
    node = ir.node(op_type, inputs, attributes=attributes)
    nodes.append(node)
    return node.outputs[0]


def _const(nodes: list[ir.Node], array: np.ndarray) -> ir.Value:
    return _add(nodes, "Constant", [], value=ir.tensor(array))


GREEDY_OUTPUT = "next_token"


def add_greedy_token(model: ir.Model) -> dict[str, int]:
    """`next_token` = ArgMax(logits) of each row's last position, int64 [B, 1]: a greedy decoder
    on a GPU copies back 8 bytes a row instead of the whole vocabulary's logits."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None or logits.shape is None or logits.shape[1] != 1:
        return {"logits/greedy_token": 0}  # logits of every position: the host picks
    argmax = ir.node("ArgMax", [logits], attributes={"axis": 2, "keepdims": 0})
    argmax.name = "kvfuse/greedy_token"
    argmax.metadata_props[RULE_TAG] = "logits/greedy_token"
    graph.append(argmax)
    token = argmax.outputs[0]
    token.name, token.dtype = GREEDY_OUTPUT, ir.DataType.INT64
    token.shape = ir.Shape([logits.shape[0], 1])
    graph.outputs.append(token)
    return {"logits/greedy_token": 1}
