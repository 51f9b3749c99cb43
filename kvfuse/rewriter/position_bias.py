"""Recover a position-only score bias (ALiBi) by running the model's own bias builder.

A fused attention layer may carry an additive bias on its scores that depends only on positions
(MPT slices a [H, 1, max_positions] table by the total length; Bloom builds it from the mask's
cumulative sum). Rather than pattern-match each builder, the subgraph producing the bias is cut
out and evaluated at the last slot of the fixed buffer (a query at position M − 1 reading keys
0..M − 1). The bias must be linear in the key position per head — ALiBi, b[h, j] = slope[h] · j
up to a constant per row, which the softmax ignores — and the slopes are what the lowering
needs: it rebuilds the bias for any length from them.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from kvfuse.errors import KvfuseError
from kvfuse.rewriter.rotary_cache import _run

POSITION_BIAS_INPUT = 7  # CachedAttention's input holding the bias (then: 8, sink logits)


def alibi_slopes(graph: ir.Graph, bias: ir.Value, heads: int, max_context: int) -> np.ndarray:
    """Per-head slopes [heads] of the bias `bias`, evaluated for `max_context` positions.

    Raises:
        KvfuseError: the bias is not linear in the key position (not ALiBi).
    """
    nodes, inputs, feeds = _builder(bias, max_context)
    (array,) = _run(nodes, inputs, [bias], feeds)
    if array.shape[-1] != max_context:
        raise KvfuseError(
            f"position bias {bias.name} evaluates to shape {list(array.shape)}, expected "
            f"{max_context} key positions last"
        )
    rows = array.reshape(-1, max_context).astype(np.float64)
    if rows.shape[0] not in (1, heads):
        rows = array.reshape(-1, heads, max_context)[0]  # a batch axis in front: row 0
    keys = np.arange(max_context, dtype=np.float64)
    slopes = (rows[:, -1] - rows[:, 0]) / (max_context - 1)
    linear = rows[:, :1] + slopes[:, None] * keys
    if not np.allclose(rows, linear, atol=1e-4, rtol=1e-4):
        raise KvfuseError(
            f"the additive bias {bias.name} on the attention scores depends on positions but "
            "is not linear in the key position (ALiBi); no lowering rebuilds it"
        )
    return np.broadcast_to(slopes, (heads,)).astype(np.float32).copy()


MASK_INPUT = 9  # CachedAttention's input holding the layer's own mask


def mask_window(graph: ir.Graph, mask: ir.Value, kind: str, max_context: int) -> int | None:
    """The sliding window a layer's mask encodes: how many keys the query in the buffer's
    last slot sees (None: all of them). `kind` says how the mask reads ("add": 0 visible,
    very negative hidden; "keep": True visible; "fill": True hidden)."""
    nodes, inputs, feeds = _builder(mask, max_context)
    (array,) = _run(nodes, inputs, [mask], feeds)
    if array.shape[-1] != max_context:
        raise KvfuseError(
            f"attention mask {mask.name} evaluates to shape {list(array.shape)}, expected "
            f"{max_context} key positions last"
        )
    row = array.reshape(-1, max_context)[-1]
    visible = {"add": row > -1e4, "keep": row.astype(bool), "fill": ~row.astype(bool)}[kind]
    seen = int(visible.sum())
    if not visible[-seen:].all():
        raise KvfuseError(
            f"attention mask {mask.name} hides keys other than the oldest ones at the last "
            "position; it is not a causal (or sliding-window causal) mask"
        )
    return None if seen == max_context else seen


def _builder(bias: ir.Value, max_context: int):
    """The nodes computing `bias` (graph order), the values fed to them and their feeds.

    Shape nodes are cut and fed the shape their input has at that step (a present cache of
    M positions, one new token): what they read may be computed by fused kvfuse ops (the
    previous layer's attention), which onnxruntime cannot run."""
    sizes = {"batch_size": 1, "sequence_length": 1, "past_sequence_length": max_context - 1}
    seen, inputs, feeds, stack = set(), {}, {}, [bias]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            if value.is_graph_input():
                inputs[value.name], feeds[value.name] = value, _stand_in(value, max_context)
            continue
        if node in seen:
            continue
        shape = _shape_at_last_slot(node, sizes) if node.op_type == "Shape" else None
        if shape is not None:
            inputs[value.name], feeds[value.name] = value, shape
            continue
        if node.domain not in ("", "ai.onnx"):
            raise KvfuseError(
                f"cannot evaluate {bias.name}: it is computed through {node.op_type} "
                f"({node.domain}), which only the rewritten model runs"
            )
        seen.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    nodes = [node for node in bias.graph if node in seen]
    return nodes, list(inputs.values()), feeds


def _shape_at_last_slot(shape_node: ir.Node, sizes: dict) -> np.ndarray | None:
    """What `shape_node` reads at that step, or None if its input's dims are not all known
    sizes (then the Shape is evaluated with the nodes above it)."""
    source = shape_node.inputs[0]
    grown = _cache_concat_shape(source, sizes)
    if grown is not None:
        dims = grown
    elif source.shape is None:
        return None
    else:
        dims = _known_dims(source.shape, sizes)
    if dims is None:
        return None
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", len(dims))
    return np.array(dims[start:end], dtype=np.int64)


def _cache_concat_shape(value: ir.Value, sizes: dict) -> list[int] | None:
    """A KV cache grown by one token, Concat(past, new): the past's dims, its axis + 1."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or not node.inputs[0].is_graph_input():
        return None
    past = _known_dims(node.inputs[0].shape or [], sizes)
    if past is None:
        return None
    axis = node.attributes.get_int("axis", 0) % len(past)
    return [d + 1 if i == axis else d for i, d in enumerate(past)]


def _known_dims(shape, sizes: dict) -> list[int] | None:
    dims = []
    for dim in shape:
        size = dim if isinstance(dim, int) else _sum_of_names(str(dim), sizes)
        if size is None:
            return None
        dims.append(size)
    return dims


_TERM = re.compile(r"\s*([+-]?)\s*([A-Za-z_][\w]*|\d+)\s*")


def _sum_of_names(expression: str, sizes: dict) -> int | None:
    """A symbolic dim written as names and numbers added or subtracted
    ("past_sequence_length + sequence_length"), or None if it is anything else."""
    total, position = 0, 0
    while position < len(expression):
        term = _TERM.match(expression, position)
        if term is None or (position and not term.group(1)):
            return None
        sign, token = term.groups()
        value = int(token) if token.isdigit() else sizes.get(token)
        if value is None:
            return None
        total += -value if sign == "-" else value
        position = term.end()
    return total if position else None


def _stand_in(value: ir.Value, max_context: int) -> np.ndarray:
    """Inputs as at the decode step that fills the buffer's last slot: one row, one new token
    at position M − 1 after M − 1 past positions, every position valid."""
    if value.name == "position_ids":
        return np.full((1, 1), max_context - 1, dtype=np.int64)
    if value.name == "attention_mask":
        return np.ones((1, max_context), dtype=value.dtype.numpy())
    dims = list(value.shape or [])
    if value.name == "input_ids" or not dims:
        return np.zeros([1] * len(dims), dtype=value.dtype.numpy())
    # a past cache: batch 1, its symbolic length M − 1, static dims as they are
    shape = [1] + [d if isinstance(d, int) else max_context - 1 for d in dims[1:]]
    return np.zeros(shape, dtype=value.dtype.numpy())
