"""Lowering for target `onnx`: kvfuse ops → standard ONNX (opset 24), no vendor domain.

Legend: B batch, S new tokens, M max_context (the fixed buffer), H heads, Hkv kv heads, D head
dim, R rotary dims.

- RMSNorm → RMSNormalization (opset 23); a residual Add stays an Add (no standard skip-norm).
- CachedAttention → per layer

    q_flat [B,S,H·D] ─ [RotaryEmbedding] ─ Reshape [B,S,H,D] ─ Transpose ──────────── q ─┐
    k_flat ─ [RotaryEmbedding] ─ Reshape ─ Transpose ─ TensorScatter(past_k) ═ present_k ─ Attention
    v_flat ───────────────────── Reshape ─ Transpose ─ TensorScatter(past_v) ═ present_v ─┘   │
                                                     y_flat ─ Reshape ─ Transpose [B,S,H,D] ─┘

  TensorScatter writes the S new positions of each row at its write index into the fixed
  [B, Hkv, M, D] buffer — in place when the runtime binds past and present to one buffer.
  Attention (GQA by its 4-D head counts) reads the whole buffer, masked by position: key j is
  visible to the query at position p iff j ≤ p (and j > p − window under a sliding window),
  so stale or padded buffer slots are never read. Per graph, from `seqlens_k` and S:

      write_index[b] = max(0, seqlens_k[b] + 1 − S)   (0 for a first, right-padded prompt)
      position[b, i] = write_index[b] + i              (RoPE positions, mask rows)

  The rotary tables are the same baked [M, R/2] cos/sin the `ort` target hands to GQA.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from kvfuse.patterns.lower_ort import (
    RMSNormRule,
    modifier_notes,
    score_attributes,
    transposed_weight_check,
)
from kvfuse.patterns.write_positions import build_write_positions
from kvfuse.rewriter.pipeline import layer_of
from kvfuse.rewriter.rules import (
    LOWERING_REASON_TAG,
    LOWERING_TAG,
    REPLACED_TAG,
    RULE_TAG,
    Rule,
    fail,
    ok,
    replaced_by,
    take_over,
)

OPSET = 24  # TensorScatter; Attention, RotaryEmbedding and RMSNormalization since 23


NORM_RULES = [RMSNormRule.rule("lower/rms_standard", "RMSNormalization")]


class TransposedWeightRule(Rule):
    """`lower/transposed_weight_gemm`: MatMul(x, Transpose(W)) of a constant 2-D W → Gemm(x, W,
    transB=1), with x flattened to 2-D and the result reshaped back. A tied LM head reads the
    embedding table transposed; left as it is, onnxruntime folds the Transpose at load into a
    second copy of the table (113 MB for SmolLM2) per session."""

    def __init__(self) -> None:
        super().__init__("lower/transposed_weight_gemm")

    def pattern(self, op, x, weight):
        transposed = op.Transpose(weight, _allow_other_attributes=True, _outputs=["transposed"])
        return op.MatMul(x, transposed, _outputs=["product"])

    def check(self, context, x, weight, transposed, product, **_):
        checked = transposed_weight_check(weight, transposed)
        if not checked:
            return checked
        if _flat_target(x) is None or _flat_target(product) is None:
            return fail(f"input shape {x.shape}: Gemm needs at most one unknown dim", x)
        return ok()

    def rewrite(self, op, x, weight, product, **_):
        rows = op.Reshape(x, op.Constant(value=ir.tensor(np.array([-1, x.shape[-1]]))))
        gemm = op.Gemm(rows, weight, transB=1)
        target = np.array(_flat_target(product), dtype=np.int64)
        return op.Reshape(gemm, op.Constant(value=ir.tensor(target)))


def _flat_target(value: ir.Value) -> list[int] | None:
    """A Reshape target for `value`'s shape: its dims, one unknown one as -1; None if the last
    dim is unknown or more than one is."""
    if value.shape is None or not isinstance(value.shape[-1], int):
        return None
    dims = [d if isinstance(d, int) else -1 for d in value.shape]
    return dims if dims.count(-1) <= 1 else None


WEIGHT_RULES = [TransposedWeightRule.rule()]


def convert_opset(model: ir.Model) -> dict[str, int]:
    """Move the graph to opset 24 (onnxscript's version converter adapts changed ops)."""
    from onnxscript import version_converter

    before = model.opset_imports.get("", 0)
    if before < OPSET:
        version_converter.convert_version(model, target_version=OPSET)
    model.ir_version = max(model.ir_version or 0, 12)  # opset 24 needs IR 12
    return {"lower/opset_24": int(before < OPSET)}


class AttentionLowering:
    """Lowers each CachedAttention of one graph; the positions and masks are built once."""

    def __init__(self, max_context: int) -> None:
        self.max_context = max_context
        self._positions: tuple[ir.Value, ir.Value] | None = None
        self._masks: dict[int | None, ir.Value] = {}

    def __call__(self, graph, node, presents, seqlens_k, total_length, rotary, window):
        """Replace `node` by standard ops; returns the new (present_k, present_v) values."""
        del total_length  # the write index comes from seqlens_k and S
        attributes = node.attributes
        heads, kv_heads = attributes.get_int("num_heads"), attributes.get_int("kv_num_heads")
        head_dim = node.inputs[4].shape[-1]  # D is last in every value cache (a key: maybe not)
        builder = tape.Tape()
        write_index, positions = self._shared_positions(graph, node, seqlens_k)
        mask = self._mask(graph, node, positions, window)
        q, k, v = node.inputs[:3]
        if attributes.get_string("layout") == "SBHD":  # projections are [S, B, H·D]
            q, k, v = (builder.op("Transpose", [x], {"perm": [1, 0, 2]}) for x in (q, k, v))
        if rotary is not None:
            q = _rotate(builder, q, rotary, positions, heads, head_dim, attributes)
            k = _rotate(builder, k, rotary, positions, kv_heads, head_dim, attributes)
        past_k, past_v = node.inputs[3:5]
        present_k = _scatter(
            builder, past_k, _heads_first(builder, k, kv_heads, head_dim), write_index
        )
        present_v = _scatter(
            builder, past_v, _heads_first(builder, v, kv_heads, head_dim), write_index
        )
        query = _heads_first(builder, q, heads, head_dim)
        scale = attributes.get_float("scale")
        keys, values, mask = score_modified(
            builder, node, present_k, present_v, mask, self.max_context
        )
        attended = builder.op(
            "Attention", [query, keys, values, mask], {"scale": scale, **score_attributes(node)}
        )
        output = builder.op("Transpose", [attended], {"perm": [0, 2, 1, 3]})
        output = builder.op("Reshape", [output, _ints(builder, [0, 0, heads * head_dim])])
        if attributes.get_string("layout") == "SBHD":
            output = builder.op("Transpose", [output], {"perm": [1, 0, 2]})
        _tag(builder.nodes, node, presents)
        kind, reason = (
            ("rotary-op+attention", "RoPE by the standard RotaryEmbedding, then Attention")
            if rotary is not None
            else ("attention", "standard Attention over the fixed buffer")
        )
        reason = "; ".join([reason, *modifier_notes(node, window, ATTENTION_CARRIES)])
        for lowered in builder.nodes:
            lowered.metadata_props[LOWERING_TAG] = kind
            lowered.metadata_props[LOWERING_REASON_TAG] = reason
        graph.insert_before(node, builder.nodes)
        take_over(graph, node.outputs[0], output)
        for old, new in zip(presents, (present_k, present_v), strict=True):
            take_over(graph, old, new)
        graph.remove(node, safe=True)
        return present_k, present_v

    def _shared_positions(self, graph, anchor, seqlens_k):
        """(write_index [B], position [B, S]) int64, built before the first attention."""
        if self._positions is None:
            self._positions = build_write_positions(graph, anchor, seqlens_k)
        return self._positions

    def _mask(self, graph, anchor, positions, window):
        """bool [B, 1, S, M]: key j visible to the query at position p iff j ≤ p (and
        j > p − window)."""
        if window not in self._masks:
            builder = tape.Tape()
            keys = _ints(builder, np.arange(self.max_context, dtype=np.int64))
            query = builder.op("Unsqueeze", [positions, _ints(builder, [2])])  # [B, S, 1]
            visible = builder.op("LessOrEqual", [keys, query])
            if window is not None:
                oldest = builder.op("Sub", [query, _ints(builder, window)])
                visible = builder.op("And", [visible, builder.op("Greater", [keys, oldest])])
            mask = builder.op("Unsqueeze", [visible, _ints(builder, [1])])
            _tag_rule(builder.nodes, "lower/position_mask")
            graph.insert_before(anchor, builder.nodes)
            self._masks[window] = mask
        return self._masks[window]


def _rotate(builder, flat, tables, positions, heads, head_dim, attributes) -> ir.Value:
    cos, sin = tables
    rotary_dims = 2 * cos.shape[-1]
    return builder.op(
        "RotaryEmbedding",
        [flat, cos, sin, positions],
        {
            "num_heads": heads,
            "interleaved": attributes.get_int("rotary_interleaved", 0),
            "rotary_embedding_dim": rotary_dims if rotary_dims < head_dim else 0,
        },
    )


def _heads_first(builder, flat: ir.Value, heads: int, head_dim: int) -> ir.Value:
    """[B, S, H·D] → [B, H, S, D]."""
    split = builder.op("Reshape", [flat, _ints(builder, [0, 0, heads, head_dim])])
    return builder.op("Transpose", [split], {"perm": [0, 2, 1, 3]})


def _scatter(builder, past: ir.Value, new: ir.Value, write_index: ir.Value) -> ir.Value:
    return builder.op("TensorScatter", [past, new, write_index], {"axis": 2, "mode": "linear"})


def _ints(builder, values) -> ir.Value:
    return builder.op("Constant", [], {"value": ir.tensor(np.asarray(values, dtype=np.int64))})


def _tag(nodes: list[ir.Node], fused: ir.Node, presents) -> None:
    concats = [entry for present in presents for entry in replaced_by(present.producer())]
    entries = dict.fromkeys(tuple(e) for e in replaced_by(fused) + concats)  # ordered, unique
    rule = fused.metadata_props.get(RULE_TAG, "attention/cached")
    layer = layer_of(fused.inputs[3].name) or fused.name
    for index, node in enumerate(nodes):
        node.name = f"/model/layers.{layer}/attn/{node.op_type}_{index}"
        node.metadata_props[RULE_TAG] = rule
        node.metadata_props[REPLACED_TAG] = json.dumps([list(e) for e in entries])


def _tag_rule(nodes: list[ir.Node], rule: str) -> None:
    for node in nodes:
        node.metadata_props[RULE_TAG] = rule


# --- score modifiers (issue 11): ALiBi and attention sinks over the fixed buffer


def score_modified(builder, node, present_k, present_v, mask, length: int):
    """(keys, values, mask) for standard Attention with the layer's score modifiers: ALiBi
    turns the boolean position mask into slope · key position where visible, −inf elsewhere;
    sinks become one more key of zeros (score 0) whose mask entry is the sink logit, so the
    softmax's denominator gains exp(sink) and the zero value adds nothing."""
    slopes = node.inputs[7] if len(node.inputs) > 7 else None
    sinks = node.inputs[8] if len(node.inputs) > 8 else None
    if slopes is None and sinks is None:
        return present_k, present_v, mask
    heads = node.attributes.get_int("num_heads")
    bias = _floats(builder, np.zeros((1, heads, 1, 1), dtype=np.float32))
    if slopes is not None:
        keys = _floats(builder, np.arange(length, dtype=np.float32).reshape(1, 1, 1, -1))
        column = builder.op("Reshape", [slopes, _ints(builder, [1, heads, 1, 1])])
        bias = builder.op("Mul", [column, keys])  # [1, H, 1, M]
    hidden = _floats(builder, np.array(-np.inf, dtype=np.float32))
    scores_mask = builder.op("Where", [mask, bias, hidden])  # [B, H, S, M]
    if sinks is None:
        return present_k, present_v, scores_mask
    from kvfuse.patterns.attention.modifiers import sink_logits

    logits = np.broadcast_to(sink_logits(sinks), (heads,)).reshape(1, heads, 1, 1)
    first = builder.op(
        "Slice", [mask, _ints(builder, [0]), _ints(builder, [1]), _ints(builder, [3])]
    )
    sink_column = builder.op("Where", [first, _floats(builder, logits), _floats(builder, logits)])
    full_mask = builder.op("Concat", [scores_mask, sink_column], {"axis": 3})
    return _with_zero_slot(builder, present_k), _with_zero_slot(builder, present_v), full_mask


def _with_zero_slot(builder, cache: ir.Value) -> ir.Value:
    """[B, Hkv, M, D] → [B, Hkv, M + 1, D], the extra slot zeros."""
    shape = builder.op("Shape", [cache])
    slot = builder.op(
        "Concat",
        [
            builder.op("Slice", [shape, _ints(builder, [0]), _ints(builder, [2])]),
            _ints(builder, [1]),
            builder.op("Slice", [shape, _ints(builder, [3]), _ints(builder, [4])]),
        ],
        {"axis": 0},
    )
    zeros = builder.op("ConstantOfShape", [slot], {"value": ir.tensor(np.zeros(1, np.float32))})
    return builder.op("Concat", [cache, zeros], {"axis": 2})


def _floats(builder, values) -> ir.Value:
    return builder.op("Constant", [], {"value": ir.tensor(np.asarray(values, dtype=np.float32))})


ATTENTION_CARRIES = {
    "softcap": "soft-capping as softcap",
    "alibi": "ALiBi slopes in the float position mask",
    "sinks": "sinks as one zero key whose mask entry is the sink logit",
    "window": "sliding window {} in the position mask",
}
