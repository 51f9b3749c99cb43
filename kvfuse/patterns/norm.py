"""RMSNorm: y = w · x / sqrt(mean(x², last axis) + ε)  →  kvfuse RMSNorm(x, w, epsilon).

    x ─┬─ Pow(2) ─ ReduceMean(-1) ─ Add(ε) ─ Sqrt ─ Div(1, ·) | Reciprocal ─┐
       └──────────────────────────────────────────────── Mul ────────────┴─ Mul(w) ─ y
                                                           (or Div(x, Sqrt(·)))

TorchScript exports (Optimum) write `Div(1, Sqrt)` then `Mul(x, ·)`; the dynamo exporter
writes `Reciprocal(Sqrt)`; some hand-written graphs divide x by the root directly. fp16/bf16
exports upcast x to fp32 first and cast the normalized value back before the weight
(transformers' `hidden_states.to(float32)` … `weight * hidden_states.to(input_dtype)`): the
fused op takes x in its own type and normalizes in fp32 (onnxruntime's `stash_type` default).
Optimum's fp16 export keeps the residual in fp32 after the first attention (x fp32, weight
fp16): the fused norm then runs in fp32 and its result is cast to fp16, as the export does.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvfuse.rewriter.rules import KVFUSE_DOMAIN, Rule, add_initializer, fail, like, ok


class RMSNormRule(Rule):
    """`norm/rms`: the decomposed RMSNorm chain → kvfuse RMSNorm."""

    def __init__(self) -> None:
        super().__init__("norm/rms")

    def pattern(self, op, x, weight, axes, epsilon, two, one):
        x = pattern.OrValue([op.Cast(x, _outputs=["up"]), x], tag_var="up_how", tag_values=[1, 0])
        squared = pattern.OrValue(
            [op.Pow(x, two), op.Mul(x, x)], tag_var="square_how", tag_values=["pow", "mul"]
        )
        mean = op.ReduceMean(squared, axes, _outputs=["mean"])
        root = op.Sqrt(op.Add(mean, epsilon))
        normalized = pattern.OrValue(
            [op.Mul(x, op.Div(one, root)), op.Mul(x, op.Reciprocal(root)), op.Div(x, root)],
            tag_var="divide_how",
            tag_values=["div", "reciprocal", "direct"],
        )
        normalized = pattern.OrValue(
            [op.Cast(normalized, _outputs=["down"]), normalized],
            tag_var="down_how",
            tag_values=[1, 0],
        )
        return op.Mul(normalized, weight, _outputs=["y"])

    def check(self, context, x, weight, axes, epsilon, mean, **bound):
        # an fp32 x's upcast is an identity the clean-up removed (Optimum's fp16 export)
        cast_back_only = not bound["up_how"] and bound["down_how"] and x.dtype == ir.DataType.FLOAT
        if bound["up_how"] != bound["down_how"] and not cast_back_only:
            return fail("x is cast for the norm but the result is not cast back (or vice versa)", x)
        if cast_back_only and bound["down"].producer().attributes.get_int("to") != weight.dtype:
            return fail("the norm's result is cast to another type than its weight's", x)
        if bound["up_how"] and (
            bound["up"].producer().attributes.get_int("to") != ir.DataType.FLOAT
            or bound["down"].producer().attributes.get_int("to") != weight.dtype
            or x.dtype not in (weight.dtype, ir.DataType.FLOAT)
        ):
            return fail("casts around the norm are not x → float32 → the weight's type", x)
        if bound["square_how"] == "pow" and not is_constant(bound["two"], 2.0):
            return fail("Pow exponent is not 2", bound["two"])
        if bound["divide_how"] == "div" and not is_constant(bound["one"], 1.0):
            return fail("inverse root is not 1/sqrt(·)", bound["one"])
        if x.shape is None or not isinstance(x.shape[-1], int):
            return fail(f"normalized tensor {x.name} has no static last dim", x)
        reduce_node = mean.producer()
        axis_values = _ints(axes)
        if axis_values not in ([-1], [len(x.shape) - 1]):
            return fail(f"ReduceMean axes {axis_values}, expected the last axis [-1]", reduce_node)
        if reduce_node.attributes.get_int("keepdims", 1) != 1:
            return fail("ReduceMean keepdims=0, expected 1", reduce_node)
        if weight.const_value is None or weight.const_value.shape != ir.Shape([x.shape[-1]]):
            return fail(f"weight {weight.name} is not a constant [{x.shape[-1]}]", weight)
        if epsilon.const_value is None or epsilon.const_value.numpy().size != 1:
            return fail(f"epsilon {epsilon.name} is not a constant scalar", epsilon)
        return ok()

    def rewrite(self, op, x, weight, epsilon, y, **_):
        eps = float(epsilon.const_value.numpy().reshape(-1)[0])
        if x.dtype == weight.dtype or x.dtype is None or weight.dtype is None:
            return like(op.RMSNorm(x, weight, epsilon=eps, _domain=KVFUSE_DOMAIN), x)
        # Optimum's fp16 export keeps the residual stream in fp32 and casts the normalized x to
        # fp16 before the fp16 weight: the fused norm runs in fp32 (weight widened, exact),
        # its result cast to the weight's type for the fp16 projections that read it
        wide = add_initializer(
            x.graph, f"{weight.name}.float32", weight.const_value.numpy().astype(np.float32)
        )
        normed = like(op.RMSNorm(x, wide, epsilon=eps, _domain=KVFUSE_DOMAIN), x)
        return like(op.Cast(normed, to=weight.dtype), y)


def is_constant(value: ir.Value | None, number: float) -> bool:
    """Whether `value` is a constant whose every element equals `number`."""
    if value is None or value.const_value is None:
        return False
    array = value.const_value.numpy()
    return array.size >= 1 and bool((array == number).all())


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


RULES = [RMSNormRule.rule()]
