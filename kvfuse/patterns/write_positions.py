"""Positions of the new tokens in a fixed KV buffer, from the retained-state inputs.

Legend: B batch, S new tokens. Per graph, from `seqlens_k` (valid positions − 1 per row, after
this step) and S (input_ids' second dim):

    write_index[b] = max(0, seqlens_k[b] + 1 − S)   (0 for a first, right-padded prompt)
    position[b, i] = write_index[b] + i              (RoPE positions, mask rows)

This is where GroupQueryAttention's own fused rotary puts the new tokens; a lowering that
applies RoPE as its own op (either target) or scatters into the buffer (`onnx`) uses the same
positions, built once per graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from kvfuse.rewriter.rules import RULE_TAG

INPUT_IDS = "input_ids"


def build_write_positions(
    graph: ir.Graph, anchor: ir.Node, seqlens_k: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """Insert, before `anchor`, the nodes computing (write_index [B], position [B, S]) int64.

    Args:
        graph: the graph whose `input_ids` input gives S.
        anchor: the node the new nodes go before (the first lowered attention).
        seqlens_k: the int32 [B] retained-state input.

    Returns:
        The write index per row and the position of each new token.
    """
    builder = tape.Tape()
    input_ids = next(v for v in graph.inputs if v.name == INPUT_IDS)
    new = builder.op("Shape", [input_ids], {"start": 1, "end": 2})  # [S]
    seqlens = builder.op("Cast", [seqlens_k], {"to": ir.DataType.INT64})
    first = builder.op("Add", [seqlens, builder.op("Sub", [_ints(builder, [1]), new])])
    write_index = builder.op("Max", [first, _ints(builder, [0])])
    steps = builder.op(
        "Range", [_ints(builder, 0), builder.op("Squeeze", [new]), _ints(builder, 1)]
    )
    positions = builder.op(
        "Add",
        [
            builder.op("Unsqueeze", [write_index, _ints(builder, [1])]),
            builder.op("Unsqueeze", [steps, _ints(builder, [0])]),
        ],
    )
    for node in builder.nodes:
        node.metadata_props[RULE_TAG] = "lower/positions"
    graph.insert_before(anchor, builder.nodes)
    return write_index, positions


def _ints(builder, values) -> ir.Value:
    return builder.op("Constant", [], {"value": ir.tensor(np.asarray(values, dtype=np.int64))})
