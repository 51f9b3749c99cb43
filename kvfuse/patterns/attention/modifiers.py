"""Score modifiers between Q·Kᵀ and the softmax — sub-patterns of `attention/sdpa_<layout>`.

Legend: B batch, H heads, S new tokens, T total positions.

    scores ─ [Div|Mul(c) ─ Tanh ─ Mul(c)] ─ [Add(bias)] ─ mask ─ [Cast]
           ─ [Concat(·, sink) ─ [Sub(·, ReduceMax(·))]] ─ Softmax ─ … ─ [Slice(:-1)] ─ MatMul(v)

- soft-capping: c·tanh(scores / c) (Gemma 2's `attn_logit_softcapping`);
- a position bias added to the scores that depends only on positions (ALiBi: MPT's sliced
  per-head table, computed from no activation); its values are evaluated at lowering time;
- attention sinks: a learned logit per head joins each row of the softmax as one more column
  and is sliced off the probabilities (GPT-OSS); the max subtraction before the softmax is
  the exporter's stabiliser and changes nothing.

The fused Attention records them as `softcap` (0: none) and the optional inputs 4 (position
bias) and 5 (per-head sink logits, [H]).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvfuse.rewriter.rules import fail

# graph inputs a position bias may read: the positions themselves, and shapes (a past's length)
_POSITION_INPUTS = ("attention_mask", "position_ids")


def score_modifiers(op, scores):
    """Optional soft-capping, then an optional additive position bias."""
    cap_in, cap_out, bias = pattern.Var("cap_in"), pattern.Var("cap_out"), pattern.Var("bias")
    inner = pattern.OrValue(
        [op.Div(scores, cap_in), op.Mul(scores, cap_in)],
        tag_var="cap_how",
        tag_values=["div", "mul"],
    )
    capped = op.Mul(op.Tanh(inner), cap_out)
    scores = pattern.OrValue([capped, scores], tag_var="softcapped", tag_values=[1, 0])
    return pattern.OrValue([op.Add(scores, bias), scores], tag_var="biased", tag_values=[1, 0])


def with_sinks(op, scores):
    """Scores joined by one sink column per row (and the max subtraction before Softmax)."""
    sink = pattern.Var("sink")
    joined = op.Concat(scores, sink, _outputs=["joined"])
    stable = op.Sub(
        joined, op.ReduceMax(joined, _allow_other_inputs=True, _allow_other_attributes=True)
    )
    return pattern.OrValue(
        [stable, joined, scores], tag_var="sinks", tag_values=["stable", "joined", "none"]
    )


def without_sinks(op, probs):
    """The probabilities with the sink column sliced off."""
    return pattern.OrValue(
        [op.Slice(probs, _allow_other_inputs=True, _outputs=["unsunk"]), probs],
        tag_var="sink_slice",
        tag_values=[1, 0],
    )


def check_modifiers(bound: dict) -> pattern.MatchResult | None:
    """None when the modifiers bound are what they must be, else the failure."""
    if bound.get("softcapped") and softcap(bound) is None:
        return fail("tanh soft-capping of the scores divides and multiplies by different constants")
    if bound.get("biased"):
        reason = _position_only(bound["bias"])
        if reason is not None:
            return fail(f"additive bias on the scores {reason}", bound["bias"])
    if bound.get("sinks", "none") != "none" or bound.get("sink_slice"):
        return _check_sinks(bound)
    return None


def _check_sinks(bound: dict) -> pattern.MatchResult | None:
    if bound.get("sinks", "none") == "none" or not bound.get("sink_slice"):
        return fail("a softmax column is added or sliced off, but not both (attention sinks)")
    joined = bound["joined"].producer()
    if joined.attributes.get_int("axis", 0) not in (-1, 3):
        return fail("sink logits joined on an axis other than the keys'", bound["joined"])
    if sink_logits(bound["sink"]) is None:
        return fail("sink logits are not a constant per head", bound["sink"])
    starts, ends, *rest = (_ints(v) for v in bound["unsunk"].producer().inputs[1:])
    axes = rest[0] if rest else None
    if starts != [0] or ends != [-1] or axes not in (None, [-1], [3]):
        return fail(f"probabilities sliced [{starts}:{ends}] on {axes}, not the sink column off")
    return None


def softcap(bound: dict) -> float | None:
    """c of c·tanh(s / c), or None if the two constants do not agree."""
    inner, outer = _scalar(bound["cap_in"]), _scalar(bound["cap_out"])
    if inner is None or outer is None or outer <= 0:
        return None
    cap = inner if bound["cap_how"] == "div" else 1.0 / inner
    return outer if np.isclose(cap, outer, rtol=1e-6) else None


def sink_logits(value: ir.Value) -> np.ndarray | None:
    """The per-head constant a sink column is broadcast from (through Expand, Reshape, …)."""
    while value is not None and value.const_value is None:
        node = value.producer()
        if node is None or node.op_type not in (
            "Expand",
            "Reshape",
            "Unsqueeze",
            "Cast",
            "Identity",
        ):
            return None
        value = node.inputs[0]
    if value is None:
        return None
    array = value.const_value.numpy().astype(np.float32)
    return array.reshape(-1) if array.size == max(array.shape or (1,)) else None


def modifier_inputs(bound: dict) -> list[ir.Value | None]:
    """The fused op's inputs 4 and 5: position bias and sink logits (None where absent)."""
    bias = bound["bias"] if bound.get("biased") else None
    sinks = bound["sink"] if bound.get("sink_slice") else None
    return [bias, sinks]


def modifier_attributes(bound: dict) -> dict:
    return {"softcap": softcap(bound)} if bound.get("softcapped") else {}


def _position_only(bias: ir.Value) -> str | None:
    """Why `bias` is not a function of positions alone (None if it is)."""
    seen, stack = set(), [bias]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            # graph inputs read through Shape are never reached: Shape nodes are not followed
            if value.is_graph_input() and value.name not in _POSITION_INPUTS:
                return f"reads {value.name} (expected only positions and shapes)"
            continue
        if node in seen or node.op_type == "Shape":
            continue
        seen.add(node)
        if node.domain not in ("", "ai.onnx"):
            return f"is computed by {node.op_type} ({node.domain}), not from positions alone"
        stack.extend(v for v in node.inputs if v is not None)
    return None


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.numpy().size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in value.const_value.numpy().reshape(-1)]
