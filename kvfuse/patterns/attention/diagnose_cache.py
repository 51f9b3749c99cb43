"""Why did a fused attention core not take its KV cache? A plain-words walk of Q's and K's paths.

When the attention core fused (a kvfuse Attention is left) but the cached rule did not, the
matcher's own reason names one node ("OpType mismatch: expected Reshape, got RMSNorm"). This
walks what the cached rule expects, from the attention's key back to its projection,

    k_flat ─ Reshape ─ [per-head norm] ─ [RepeatKV] ─ [Transpose] ─ [Rotary] ─ [Transpose]
           ─ Concat(past_k, ·) ─ [RepeatKV] ─ Attention

(and the query's path, without the cache), and names the first step that is not one of these,
in the structure's words: "per-head RMSNorm on K after RoPE is not matched".
"""

from __future__ import annotations

import onnx_ir as ir

from kvfuse.patterns.attention.diagnose import diagnose_softmax
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, NearMiss

NORMS = ("RMSNorm", "LayerNormalization")
STEPS = ("Transpose", "Rotary", "RepeatKV")


def diagnose_layer(node: ir.Node) -> NearMiss | None:
    """The first constraint a leftover Softmax or kvfuse Attention breaks, or None."""
    if node.op_type == "Softmax":
        return diagnose_softmax(node)
    if node.domain != KVFUSE_DOMAIN or node.op_type != "Attention":
        return None
    for check in (_key_cache, _path_of("K", 1), _path_of("Q", 0)):
        found = check(node)
        if found is not None:
            text, culprits = found
            return NearMiss(
                "attention/cached (diagnosis)",
                node.name or "Attention",
                0,
                text,
                [c.name or c.op_type for c in culprits],
            )
    return None


def _key_cache(attention: ir.Node):
    concat = _through(attention.inputs[1], ("RepeatKV",))
    if concat is None or concat.op_type != "Concat" or not concat.inputs[0].is_graph_input():
        found = concat.op_type if concat is not None else "a graph input"
        return f"attention's key comes from {found}, not a Concat of a past cache input", [
            attention
        ]
    return None


def _path_of(name: str, index: int):
    def check(attention: ir.Node):
        value = attention.inputs[index]
        if name == "K":
            value = _through(value, ("RepeatKV",)).inputs[1]  # the new keys of the cache Concat
        return _walk_to_projection(name, value)

    return check


def _walk_to_projection(name: str, value: ir.Value):
    """Up from the cached (or attended) heads to the head reshape of a flat projection."""
    rotated = False
    node = value.producer()
    while node is not None and node.op_type != "Reshape":
        if node.op_type in NORMS and not rotated and _rotary_above(node):
            # walking up, the norm comes before any Rotary: it normalises the rotated heads
            return (
                f"per-head {node.op_type} on {name} after RoPE is not matched (a per-head "
                "norm is fused only between the head reshape and RoPE)",
                [node],
            )
        if node.op_type in NORMS:
            node = node.inputs[0].producer()
            continue
        if node.op_type not in STEPS:
            return (
                f"{name} passes through {node.op_type} ({node.name}) between its head reshape "
                "and the attention: not a step the cached-attention rule knows (transposes, "
                "RoPE, a head repeat, a per-head norm before RoPE)",
                [node],
            )
        rotated = rotated or node.op_type == "Rotary"
        node = node.inputs[0].producer()
    return None


def _rotary_above(node: ir.Node) -> bool:
    """Whether a Rotary lies above `node` on its path to the head reshape."""
    node = node.inputs[0].producer()
    while node is not None and node.op_type in (*STEPS, *NORMS):
        if node.op_type == "Rotary":
            return True
        node = node.inputs[0].producer()
    return False


def _through(value: ir.Value, ops: tuple[str, ...]) -> ir.Node | None:
    node = value.producer()
    while node is not None and node.op_type in ops:
        node = node.inputs[0].producer()
    return node
