"""Scaled dot-product attention → kvfuse Attention(q, k, v, [mask]; scale, layout).

Legend: B batch, H heads, S new tokens, T total (past + new) positions, D head dim.

    q_BHSD ── [·s_q] ─┐
    k_L ─ Transpose(→BHDT) ─ [·s_k] ─ MatMul ─ [Cast] ─ [·s] ─ [+mask | Where(mask)] ─ [·s_m]
        ─ [Cast] ─ Softmax(-1) ─ [Cast] ─ [Where(IsNaN, 0)] ─ MatMul(v_BHTD ─ [Cast]) ─ out_BHSD

out = softmax(q·kᵀ·scale + mask)·v with scale = s_q·s_k·s·s_m (each a Mul or a Div, or absent;
CodeGen divides after adding the mask, which masks the same positions).
Optimum's TorchScript export multiplies q and kᵀ by sqrt(1/sqrt(D)) each and guards the softmax
with IsNaN/Where; other exporters scale the product once. The key arrives in the cache layout
`k_L` and is transposed to [B, H, D, T] by one perm that the `Layout` derives — none when the
key is cached pre-transposed (`Layout("BHSD", key="BHDS")`): Q·K then reads the cache as it is.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvfuse.patterns.attention.modifiers import (
    check_modifiers,
    modifier_attributes,
    modifier_inputs,
    score_modifiers,
    with_sinks,
    without_sinks,
)
from kvfuse.patterns.norm import is_constant
from kvfuse.rewriter.layout import RULE_LAYOUTS, Layout, is_identity
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, Rule, fail, like, ok


def scaled(op, x, factor, tag: str):
    """x, x·factor or x/factor, with the choice bound to `tag`."""
    return pattern.OrValue(
        [op.Mul(x, factor), op.Div(x, factor), x], tag_var=tag, tag_values=["mul", "div", "none"]
    )


def maybe_transpose(op, x, perm: list[int]):
    return x if is_identity(perm) else op.Transpose(x, perm=perm)


class SDPARule(Rule):
    """`attention/sdpa_<layout>`: the decomposed attention core → kvfuse Attention."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(f"attention/sdpa_{layout.label}")
        self.layout = layout

    def pattern(
        self, op, query, key, value, mask, q_scale, k_scale, qk_scale, mask_scale, zero, fill
    ):
        key_t = maybe_transpose(op, key, self.layout.key_transposed)
        scores = op.MatMul(scaled(op, query, q_scale, "q_how"), scaled(op, key_t, k_scale, "k_how"))
        # Optimum's fp16 export leaves fp16 right after Q·Kᵀ: mask, softmax and P·V in fp32
        scores = pattern.OrValue([op.Cast(scores), scores], tag_var="cast_qk", tag_values=[1, 0])
        scores = scaled(op, scores, qk_scale, "qk_how")
        scores = score_modifiers(op, scores)
        scores = pattern.OrValue(
            # additive mask; boolean mask kept where True (GPT-2's `Where(causal, s, min)`) or
            # filled where True (`masked_fill`); or no mask
            [
                op.Add(scores, mask),
                op.Where(mask, scores, fill),
                op.Where(mask, fill, scores),
                scores,
            ],
            tag_var="mask_how",
            tag_values=["add", "keep", "fill", "none"],
        )
        scores = scaled(op, scores, mask_scale, "masked_how")
        scores = pattern.OrValue([op.Cast(scores), scores], tag_var="cast_in", tag_values=[1, 0])
        scores = with_sinks(op, scores)
        probs = op.Softmax(scores, _outputs=["probs"])
        probs = pattern.OrValue([op.Cast(probs), probs], tag_var="cast_out", tag_values=[1, 0])
        probs = pattern.OrValue(
            [op.Where(op.IsNaN(probs), zero, probs), probs], tag_var="nan_guard", tag_values=[1, 0]
        )
        probs = without_sinks(op, probs)
        value_bhsd = maybe_transpose(op, value, self.layout.to_bhsd)
        value_bhsd = pattern.OrValue(
            [op.Cast(value_bhsd), value_bhsd], tag_var="cast_v", tag_values=[1, 0]
        )
        return op.MatMul(probs, value_bhsd, _outputs=["attention_out"])

    def check(self, context, query, key, value, probs, **bound):
        axis = probs.producer().attributes.get_int("axis", -1)
        rank = len(query.shape) if query.shape is not None else 4
        if axis not in (-1, rank - 1):
            return fail(f"Softmax over axis {axis}, expected the last (keys) axis", probs)
        head_dim = static_dim(query, -1)
        if head_dim is None:
            return fail(f"query {query.name} has no static head dim", query)
        key_dim = static_dim(key, self.layout.key_order.index("D"))
        if key_dim is not None and key_dim != head_dim:
            return fail(f"key head dim {key_dim} differs from query head dim {head_dim}", key)
        transposed = key.producer()
        if (
            is_identity(self.layout.key_transposed)
            and transposed
            and transposed.op_type == "Transpose"
        ):
            # a key transposed right before Q·Kᵀ is the usual layouts' form (their rules ran
            # first); read as pre-transposed it would hide a wrong perm from the diagnosis
            perm = list(transposed.attributes.get_ints("perm", []))
            return fail(f"key transposed by perm {perm} before Q·Kᵀ, not read as cached", key)
        if attention_scale(bound) is None:
            return fail("attention scale factors are not constant scalars", query)
        if not _float_types(query, key, value):
            return fail(f"query/key/value types differ or are not float ({query.dtype})", query)
        modified = check_modifiers(bound)
        if modified is not None:
            return modified
        if bound["masked_how"] != "none" and attention_scale(bound) <= 0:
            return fail("scores scaled after the mask by a non-positive factor", query)
        if bound["nan_guard"] and not is_constant(bound["zero"], 0.0):
            return fail("softmax guard replaces NaN by a non-zero value", bound["zero"])
        if bound["mask_how"] in ("keep", "fill") and not _very_negative(bound["fill"]):
            return fail(
                "Where-mask fills with a value that does not mask out (expected ≤ -1e4)",
                bound["fill"],
            )
        return ok()

    def rewrite(self, op, query, key, value, mask, **bound):
        # inputs 3-5: mask, position bias, per-head sink logits (None where absent)
        inputs = [query, key, value, mask if bound["mask_how"] != "none" else None]
        inputs += modifier_inputs(bound)
        while inputs[-1] is None:
            inputs.pop()
        fused = op.Attention(
            *inputs,
            scale=attention_scale(bound),
            layout=self.layout.name,
            key_layout=self.layout.key_order,
            mask_kind=bound["mask_how"],
            **modifier_attributes(bound),
            _domain=KVFUSE_DOMAIN,
        )
        out = bound["attention_out"]
        if out.dtype is None or out.dtype == query.dtype:
            return like(fused, out)
        # the scores' chain ran in another type (Optimum's fp16 export: fp32 after Q·Kᵀ); the
        # fused op computes in the inputs' type and its output is cast to what readers expect
        fused = like(fused, out)
        fused.dtype = query.dtype
        return like(op.Cast(fused, to=out.dtype), out)


def attention_scale(bound: dict) -> float | None:
    """Product of the scale factors the match bound (q, kᵀ and q·kᵀ), or None if not constant.
    Taken as found: 1/sqrt(D) is the usual value, not a requirement."""
    scale = 1.0
    for how, factor in (
        ("q_how", "q_scale"),
        ("k_how", "k_scale"),
        ("qk_how", "qk_scale"),
        ("masked_how", "mask_scale"),
    ):
        if bound.get(how, "none") == "none":
            continue
        value = bound[factor]
        if value is None or value.const_value is None or value.const_value.numpy().size != 1:
            return None
        number = float(value.const_value.numpy().reshape(-1)[0])
        scale *= number if bound[how] == "mul" else 1.0 / number
    return scale


def _float_types(query: ir.Value, key: ir.Value, value: ir.Value) -> bool:
    """q, k and v of one float type (a Cast the pattern skipped must not hide a mixed one);
    untyped values are left to the lowering's checks."""
    types = {v.dtype for v in (query, key, value) if v.dtype is not None}
    floats = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    return len(types) <= 1 and types <= floats


def _very_negative(value: ir.Value | None) -> bool:
    if value is None or value.const_value is None or value.const_value.numpy().size != 1:
        return False
    return float(value.const_value.numpy().reshape(-1)[0]) <= -1e4


def static_dim(value: ir.Value, axis: int) -> int | None:
    """`value.shape[axis]` if it is a static int, else None."""
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


RULES = [SDPARule.rule(layout) for layout in RULE_LAYOUTS]
