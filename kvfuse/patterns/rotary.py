"""RoPE, rotate-half style:  y = x·cos + rotate_half(x)·sin  →  kvfuse Rotary(x, cos, sin).

    x ─┬──────────────────────────────────────── Mul(cos) ─┐
       ├─ Slice[0:D/2] ──────────────┐                      Add ─ y
       └─ Slice[D/2:D] ─ Neg ─ Concat(-x₂, x₁, axis=-1) ─ Mul(sin) ─┘

The rotation acts on the last axis only, so the rule holds for x in any layout; cos and sin
are whatever the model's RoPE builder computed from positions (baked into fixed caches when the
attention is lowered). Llama, Mistral, Qwen2 and Phi3 exports all produce this form.
"""

from __future__ import annotations

from kvfuse.patterns.norm import _ints
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, Rule, fail, like, ok


class RotateHalfRule(Rule):
    """`rotary/half`: rotate-half RoPE on the full head dim → kvfuse Rotary."""

    def __init__(self) -> None:
        super().__init__("rotary/half")

    def pattern(self, op, x, cos, sin, start1, end1, axes1, start2, end2, axes2):
        first = op.Slice(x, start1, end1, axes1, _allow_other_inputs=True, _outputs=["first"])
        second = op.Slice(x, start2, end2, axes2, _allow_other_inputs=True, _outputs=["second"])
        rotated = op.Concat(op.Neg(second), first, _outputs=["rotated"])
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, start1, end1, axes1, start2, end2, axes2, **bound):
        first, second, rotated = bound["first"], bound["second"], bound["rotated"]
        if x.shape is None or not isinstance(x.shape[-1], int):
            return fail(f"rotated tensor {x.name} has no static head dim", x)
        head_dim, rank = x.shape[-1], len(x.shape)
        half = head_dim // 2
        last = ([-1], [rank - 1])
        if _ints(axes1) not in last or _ints(axes2) not in last:
            return fail(f"RoPE slices on axes {_ints(axes1)}/{_ints(axes2)}, expected the last")
        if (_ints(start1), _ints(end1)) != ([0], [half]):
            return fail(f"first half slice {_ints(start1)}:{_ints(end1)}, expected 0:{half}", x)
        end2_value = (_ints(end2) or [0])[0]
        if _ints(start2) != [half] or end2_value < head_dim:
            return fail(f"second half slice {_ints(start2)}:{_ints(end2)}, expected {half}:", x)
        for half_slice in (first, second):
            steps = half_slice.producer().inputs[4:]
            if steps and steps[0] is not None and _ints(steps[0]) != [1]:
                return fail(f"RoPE slice step {_ints(steps[0])}, expected 1", half_slice)
        axis = rotated.producer().attributes.get_int("axis", 0)
        if axis not in (-1, rank - 1):
            return fail(f"rotate-half Concat on axis {axis}, expected the last", rotated)
        return ok()

    def rewrite(self, op, x, cos, sin, **_):
        return like(op.Rotary(x, cos, sin, interleaved=0, _domain=KVFUSE_DOMAIN), x)


RULES = [RotateHalfRule.rule()]
