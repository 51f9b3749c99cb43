"""Lowering for target `ort`: kvfuse ops → onnxruntime contrib ops.

- RMSNorm(Add(a, b)) whose sum also feeds the residual → SkipSimplifiedLayerNormalization
  (output 3 is the sum); any other RMSNorm → SimplifiedLayerNormalization (default domain in
  onnxruntime, not com.microsoft).
- CachedAttention → com.microsoft.GroupQueryAttention over fixed [B, Hkv, max_context, D]
  buffers shared between past and present; `seqlens_k` (valid length − 1 per row) and
  `total_sequence_length` say how much of each buffer holds real positions. RoPE is fused
  (`do_rotary`) with caches baked from the model's own builder — or, per layer, where GQA's
  kernel cannot rotate that many dims (a multiple of 16 only), applied first by
  com.microsoft.RotaryEmbedding over the same tables (any width, either style):

      q_flat ─ RotaryEmbedding(position) ─┐
      k_flat ─ RotaryEmbedding(position) ─ GroupQueryAttention(do_rotary=0) ═ present_k/v
      v_flat ─────────────────────────────┘
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from kvfuse.patterns.write_positions import build_write_positions
from kvfuse.rewriter.pipeline import layer_of
from kvfuse.rewriter.rules import (
    KVFUSE_DOMAIN,
    LOWERING_REASON_TAG,
    LOWERING_TAG,
    REPLACED_TAG,
    RULE_TAG,
    Rule,
    add_initializer,
    fail,
    like,
    ok,
    replaced_by,
    take_over,
)
from kvfuse.rewriter.shapes import symbolic_ints

MS_DOMAIN = "com.microsoft"


def lower_skip_rms_norms(model: ir.Model) -> dict[str, int]:
    """`lower/skip_rms`: RMSNorm(Add(a, b)) → SkipSimplifiedLayerNormalization(a, b), whose
    output 3 (a + b) takes over the Add's other uses (the residual stream).

    A graph pass rather than a rule: the Add's output is used twice (norm and residual), and
    matching a two-output pattern would search every Add in the graph for every norm.
    """
    graph, fused = model.graph, 0
    for norm in [n for n in graph if n.domain == KVFUSE_DOMAIN and n.op_type == "RMSNorm"]:
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        a, b = add.inputs
        if not _same_shape(a, b):
            continue  # a broadcasting add is not a residual connection
        skip = ir.node(
            "SkipSimplifiedLayerNormalization",
            [a, b, norm.inputs[1]],
            domain=MS_DOMAIN,
            num_outputs=4,
            attributes={"epsilon": norm.attributes.get_float("epsilon")},
            name=f"{add.name}/SkipSimplifiedLayerNormalization",
        )
        skip.metadata_props[RULE_TAG] = "lower/skip_rms"
        skip.metadata_props[REPLACED_TAG] = json.dumps(replaced_by(norm) + replaced_by(add))
        graph.insert_before(norm, skip)
        like(skip.outputs[0], norm.outputs[0])
        like(skip.outputs[3], add.outputs[0])
        take_over(graph, norm.outputs[0], skip.outputs[0])
        take_over(graph, add.outputs[0], skip.outputs[3])
        graph.remove([norm, add], safe=True)
        fused += 1
    return {"lower/skip_rms": fused}


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Whether two tensors have one shape as far as is known: same rank, equal static dims,
    and no size-1 dim against an unknown one (which could broadcast)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    for x, y in zip(a.shape, b.shape, strict=True):
        static = isinstance(x, int), isinstance(y, int)
        if all(static) and x != y:
            return False
        if any(static) and not all(static) and 1 in (x, y):
            return False
    return isinstance(a.shape[-1], int) and a.shape[-1] == b.shape[-1]


class RMSNormRule(Rule):
    """`lower/rms` (onnxruntime's SimplifiedLayerNormalization) or `lower/rms_standard` (ONNX
    RMSNormalization, opset 23): the two ops take the same inputs and attributes."""

    def __init__(self, name: str = "lower/rms", op_type: str = "SimplifiedLayerNormalization"):
        super().__init__(name)
        self.op_type = op_type

    def pattern(self, op, x, weight):
        return op.RMSNorm(x, weight, _domain=KVFUSE_DOMAIN, _outputs=["normed"])

    def rewrite(self, op, x, weight, normed, **_):
        epsilon = normed.producer().attributes.get_float("epsilon")
        lowered = getattr(op, self.op_type)  # fp32 statistics
        return lowered(x, weight, axis=-1, epsilon=epsilon, stash_type=1)


NORM_RULES = [RMSNormRule.rule()]


class TransposedWeightRule(Rule):
    """`lower/transposed_weight`: MatMul(x, Transpose(W)) of a constant 2-D W → FusedMatMul(x,
    W, transB=1). A tied LM head (SmolLM2, Llama-style exports) reads the embedding table
    transposed; left as it is, onnxruntime folds the Transpose at load into a second copy of
    the table (113 MB for SmolLM2) in every session."""

    def __init__(self) -> None:
        super().__init__("lower/transposed_weight")

    def pattern(self, op, x, weight):
        transposed = op.Transpose(weight, _allow_other_attributes=True, _outputs=["transposed"])
        return op.MatMul(x, transposed)

    def check(self, context, x, weight, transposed, **_):
        return transposed_weight_check(weight, transposed)

    def rewrite(self, op, x, weight, **_):
        return op.FusedMatMul(x, weight, transB=1, alpha=1.0, _domain=MS_DOMAIN)


def transposed_weight_check(weight: ir.Value, transposed: ir.Value):
    """A constant matrix transposed as a whole (shared by both targets' lowering)."""
    if weight.const_value is None:
        return fail("the transposed operand is computed, not a constant weight", weight)
    perm = list(transposed.producer().attributes.get_ints("perm", []))
    if weight.shape is None or len(weight.shape) != 2 or perm not in ([1, 0], []):
        return fail(f"Transpose perm {perm} of a {weight.shape} weight, expected a 2-D [1, 0]")
    return ok()


WEIGHT_RULES = [TransposedWeightRule.rule()]


class AttentionLowering:
    """Lowers each CachedAttention of one graph to GroupQueryAttention; where GQA's fused
    rotary cannot rotate a layer's dims, RoPE becomes its own com.microsoft.RotaryEmbedding
    over the same baked tables, at positions built once per graph."""

    def __init__(self, max_context: int) -> None:
        self.max_context = max_context
        self._positions: ir.Value | None = None

    def __call__(self, graph, node, presents, seqlens_k, total_length, rotary, window):
        """Replace `node`; returns the new (present_k, present_v) values."""

        def positions() -> ir.Value:
            if self._positions is None:
                self._positions = build_write_positions(graph, node, seqlens_k)[1]
            return self._positions

        return lower_cached_attention(
            graph, node, presents, seqlens_k, total_length, rotary, window, positions
        )


def lower_cached_attention(
    graph: ir.Graph,
    node: ir.Node,
    presents: tuple[ir.Value, ir.Value],
    seqlens_k: ir.Value,
    total_length: ir.Value,
    rotary_caches: tuple[ir.Value, ir.Value] | None,
    local_window: int | None = None,
    positions: Callable[[], ir.Value] | None = None,
) -> tuple[ir.Value, ir.Value]:
    """Replace one CachedAttention node by GroupQueryAttention, which also takes over the
    layer's `present` graph outputs (so far the old Concats'); returns the new presents.

    RoPE is fused into GQA where its kernel can rotate the layer's dims; otherwise it is
    applied by RotaryEmbedding on Q and K first, at `positions()` (the new tokens' [B, S]
    positions; built for this layer when not given)."""
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    attributes = node.attributes
    q, k, v, past_k, past_v = node.inputs[:5]
    kind, reason = "gqa", "no RoPE in this layer's attention"
    if rotary_caches is not None:
        # the value cache's last dim: D in every layout (a key may be cached as [B, Hkv, D, T])
        limit = gqa_rotary_limit(2 * rotary_caches[0].shape[-1], past_v.shape[-1])
        kind, reason = ("gqa-rotary", "RoPE fused into GroupQueryAttention (do_rotary)")
        if limit is not None:
            kind, reason = "rotary-op+gqa", f"{limit}: RoPE applied by RotaryEmbedding first"
    if positions is None:  # called alone: this layer builds its own positions

        def positions() -> ir.Value:
            return build_write_positions(graph, node, seqlens_k)[1]

    seq_first = attributes.get_string("layout") == "SBHD"
    if seq_first:  # GQA takes [B, S, H·D]; sequence-first projections are [S, B, H·D]
        q, k, v = (_transpose(graph, node, x, [1, 0, 2]) for x in (q, k, v))
    if kind == "rotary-op+gqa":
        q, k = (
            _rotary_op(graph, node, x, rotary_caches, positions(), attributes.get_int(heads), tag)
            for x, heads, tag in ((q, "num_heads", "q"), (k, "kv_num_heads", "k"))
        )
    inputs = [q, k, v, past_k, past_v, seqlens_k, total_length]
    inputs += list(rotary_caches) if kind == "gqa-rotary" else [None, None]
    inputs += [None, *score_inputs(graph, node, q, total_length)]  # position_ids: not used
    while inputs[-1] is None:
        inputs.pop()
    gqa = ir.node(
        "GroupQueryAttention",
        inputs,
        domain=MS_DOMAIN,
        num_outputs=3,
        attributes={
            "num_heads": attributes.get_int("num_heads"),
            "kv_num_heads": attributes.get_int("kv_num_heads"),
            "scale": attributes.get_float("scale"),
            "do_rotary": int(kind == "gqa-rotary"),
            "rotary_interleaved": attributes.get_int("rotary_interleaved", 0),
            "local_window_size": local_window if local_window is not None else -1,
            **score_attributes(node),
        },
        name=f"/model/layers.{layer_of(past_k.name) or node.name}/attn/GroupQueryAttention",
    )
    gqa.metadata_props[RULE_TAG] = node.metadata_props.get(RULE_TAG, "attention/cached")
    reason = "; ".join([reason, *modifier_notes(node, local_window, GQA_CARRIES)])
    gqa.metadata_props[LOWERING_TAG], gqa.metadata_props[LOWERING_REASON_TAG] = kind, reason
    concats = [entry for present in presents for entry in replaced_by(present.producer())]
    entries = dict.fromkeys(tuple(e) for e in replaced_by(node) + concats)  # ordered, unique
    gqa.metadata_props[REPLACED_TAG] = json.dumps([list(e) for e in entries])
    graph.insert_before(node, gqa)
    output = gqa.outputs[0]
    if seq_first:
        output = _transpose(graph, node, output, [1, 0, 2])
    take_over(graph, node.outputs[0], output)
    for old, new in zip(presents, gqa.outputs[1:], strict=True):
        take_over(graph, old, new)
    graph.remove(node, safe=True)
    return gqa.outputs[1], gqa.outputs[2]


def gqa_rotary_limit(rotary_dim: int, head_dim: int) -> str | None:
    """Why onnxruntime's GroupQueryAttention cannot rotate `rotary_dim` of `head_dim` dims
    itself, or None if it can: it rotates R = 2 · (cos cache width) dims and refuses a cache
    width that is not a multiple of 8 or exceeds (D / 16) · 8 (group_query_attention helper,
    CPU and CUDA alike)."""
    width = rotary_dim // 2
    if width % 8 or width > (head_dim // 16) * 8:
        return (
            f"GroupQueryAttention's fused rotary rotates a multiple of 16 dims, at most "
            f"{head_dim // 16 * 16} of {head_dim}; this layer rotates {rotary_dim}"
        )
    return None


def _rotary_op(graph, anchor, flat, tables, positions, heads: int, tag: str) -> ir.Value:
    """com.microsoft.RotaryEmbedding of a [B, S, heads·D] projection (R = 2 · table width)."""
    cos, sin = tables
    node = ir.node(
        "RotaryEmbedding",
        [flat, positions, cos, sin],
        domain=MS_DOMAIN,
        attributes={
            "num_heads": heads,
            "interleaved": anchor.attributes.get_int("rotary_interleaved", 0),
            "rotary_embedding_dim": 2 * cos.shape[-1],
        },
        name=f"/model/layers.{layer_of(anchor.inputs[3].name) or anchor.name}/attn/{tag}_rotary",
    )
    node.metadata_props[RULE_TAG] = "lower/rotary_op"
    graph.insert_before(anchor, node)
    return node.outputs[0]


def _transpose(graph: ir.Graph, anchor: ir.Node, value: ir.Value, perm: list[int]) -> ir.Value:
    node = ir.node("Transpose", [value], attributes={"perm": perm})
    graph.insert_before(anchor, node)
    return node.outputs[0]


def hand_packed_qkv(model: ir.Model) -> dict[str, int]:
    """`lower/packed_qkv`: when Q, K and V are consecutive column blocks of one projection —
    the three outputs of one Split (what `patterns.packed_qkv` makes of separate projections;
    GPT-2's c_attn) or three Slices (Phi-3's qkv_proj; GPT-NeoX and Falcon once their parts
    are column blocks) — GQA takes the whole projection as its packed query (key and value
    left empty) and the split disappears."""
    graph, packed = model.graph, 0
    for gqa in [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "GroupQueryAttention"]:
        source = _already_packed(gqa)
        if source is not None:
            gqa.replace_input_with(0, source)
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            packed += 1
    return {"lower/packed_qkv": packed}


def _already_packed(gqa: ir.Node) -> ir.Value | None:
    """The tensor whose last axis Q, K and V are three consecutive Slices (Phi-3) or the three
    outputs of one Split (GPT-2, in order) of, if they are."""
    values = gqa.inputs[:3]
    split = values[0].producer() if values[0] is not None else None
    if split is not None and split.op_type == "Split" and list(values) == list(split.outputs):
        axis = split.attributes.get_int("axis", 0)
        rank = len(split.inputs[0].shape) if split.inputs[0].shape is not None else None
        if rank is not None and axis % rank == rank - 1:
            return split.inputs[0]
    slices = [value.producer() if value is not None else None for value in values]
    if any(s is None or s.op_type != "Slice" or len(s.outputs[0].uses()) != 1 for s in slices):
        return None
    source = slices[0].inputs[0]
    bounds = []
    for node in slices:
        starts, ends, axes = (symbolic_ints(v) for v in node.inputs[1:4])
        steps = symbolic_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if node.inputs[0] is not source or steps != [1] or axes not in ([-1], [2]):
            return None
        bounds.append((starts, ends))
    width = source.shape[-1] if source.shape is not None else None
    (q0, q1), (k0, k1), (v0, v1) = ((s[0], e[0]) for s, e in bounds)
    if q0 != 0 or k0 != q1 or v0 != k1 or not isinstance(width, int) or v1 < width:
        return None
    return source


# --- score modifiers (issue 11): soft-capping, ALiBi, attention sinks on GroupQueryAttention


def score_attributes(node: ir.Node) -> dict:
    """GQA's `softcap` (c·tanh(s / c) before the mask, as the fused op records it)."""
    cap = node.attributes.get_float("softcap", 0.0)
    return {"softcap": cap} if cap else {}


def score_inputs(graph: ir.Graph, node: ir.Node, q: ir.Value, total: ir.Value) -> list:
    """GQA's inputs 10 and 11: `attention_bias` [1, H, S, T] rebuilt from the layer's ALiBi
    slopes (slope · key position) and `head_sink` [H] (the per-head sink logits)."""
    slopes = _input(node, 7)
    sinks = _input(node, 8)
    bias = _alibi_bias(graph, node, slopes, q, total) if slopes is not None else None
    if sinks is not None:
        from kvfuse.patterns.attention.modifiers import sink_logits

        heads = node.attributes.get_int("num_heads")
        logits = np.broadcast_to(sink_logits(sinks), (heads,)).astype(np.float32)
        sinks = add_initializer(graph, f"kvfuse.head_sink_{layer_of(node.inputs[3].name)}", logits)
    return [bias, sinks]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _alibi_bias(graph, node, slopes, q, total) -> ir.Value:
    """slopes [H] · (0..T−1) → [1, H, S, T] (the kernel wants every query row)."""
    builder = tape.Tape()
    heads = slopes.shape[0]
    keys = builder.op(
        "Range",
        [
            builder.op("Constant", [], {"value": ir.tensor(np.array(0, dtype=np.int32))}),
            total,
            builder.op("Constant", [], {"value": ir.tensor(np.array(1, dtype=np.int32))}),
        ],
    )
    keys = builder.op("Cast", [keys], {"to": ir.DataType.FLOAT})
    column = builder.op("Reshape", [slopes, _int64s(builder, [1, heads, 1, 1])])
    bias = builder.op("Mul", [column, keys])  # [1, H, 1, T]
    rows = builder.op("Shape", [q], {"start": 1, "end": 2})
    target = builder.op(
        "Concat", [_int64s(builder, [1, heads]), rows, _int64s(builder, [1])], {"axis": 0}
    )
    bias = builder.op("Expand", [bias, target])
    for created in builder.nodes:
        created.metadata_props[RULE_TAG] = "lower/alibi_bias"
    graph.insert_before(node, builder.nodes)
    return bias


def _int64s(builder, values) -> ir.Value:
    return builder.op("Constant", [], {"value": ir.tensor(np.asarray(values, dtype=np.int64))})


# how each target's attention op carries a layer's score modifiers (added to the reason)
GQA_CARRIES = {
    "softcap": "soft-capping as softcap",
    "alibi": "ALiBi slopes rebuilt as attention_bias",
    "sinks": "sink logits as head_sink",
    "window": "sliding window {} as local_window_size",
}


def modifier_notes(node: ir.Node, window: int | None, carries: dict) -> list[str]:
    """What the lowered op carries of the layer's score modifiers and window."""
    found = {
        "softcap": bool(node.attributes.get_float("softcap", 0.0)),
        "alibi": _input(node, 7) is not None,
        "sinks": _input(node, 8) is not None,
        "window": window is not None,
    }
    return [carries[key].format(window) for key, present in found.items() if present]
