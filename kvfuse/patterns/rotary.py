"""RoPE: y = x·cos + rotate(x)·sin  →  kvfuse Rotary(x, cos, sin; interleaved, rotary_dim).

rotate-half (Llama, Mistral, Qwen2, Phi3, GPT-NeoX):

    x ─┬──────────────────────────────────────── Mul(cos) ─┐
       ├─ Slice[0:D/2] ──────────────┐                      Add ─ y
       └─ Slice[D/2:D] ─ Neg ─ Concat(-x₂, x₁, axis=-1) ─ Mul(sin) ─┘

interleaved (GPT-J style `rotate_every_two`): pairs (x₀,x₁), (x₂,x₃), … rotate together:

    x ─┬─ Slice[1::2] ─ Neg ─ Unsqueeze(-1) ─┐
       └─ Slice[0::2] ─────── Unsqueeze(-1) ─ Concat(-1) ─ Reshape(x) ─ Mul(sin) ─ Add(x·cos)

partial (GPT-NeoX `rotary_pct`, Phi): Concat(Rotary(x[..., :R]), x[..., R:]) → Rotary on R dims.

The rotation acts on the last axis only, so the rules hold for x in any layout; cos and sin are
whatever the model's RoPE builder computed from positions (baked into fixed caches when the
attention is lowered).
"""

from __future__ import annotations

import onnx_ir as ir

from kvfuse.patterns.norm import _ints
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, Rule, fail, like, ok


def _head_dim(x: ir.Value) -> int | None:
    return x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None


def _on_last_axis(axes: ir.Value, rank: int) -> bool:
    return _ints(axes) in ([-1], [rank - 1])


def _slice(value: ir.Value) -> tuple[list[int] | None, list[int] | None, int]:
    """(starts, ends, step) of a bound Slice output."""
    inputs = value.producer().inputs
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
    return _ints(inputs[1]), _ints(inputs[2]), (steps or [None])[0]


class RotateHalfRule(Rule):
    """`rotary/half`: rotate-half RoPE → kvfuse Rotary(interleaved=0)."""

    def __init__(self) -> None:
        super().__init__("rotary/half")

    def pattern(self, op, x, cos, sin):
        first = op.Slice(x, _allow_other_inputs=True, _outputs=["first"])
        second = op.Slice(x, _allow_other_inputs=True, _outputs=["second"])
        rotated = op.Concat(op.Neg(second), first, _outputs=["rotated"])
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, first, second, rotated, **_):
        head_dim = _head_dim(x)
        if head_dim is None:
            return fail(f"rotated tensor {x.name} has no static head dim", x)
        rank, half = len(x.shape), head_dim // 2
        for part in (first, second):
            if not _on_last_axis(part.producer().inputs[3], rank):
                return fail("RoPE slices not on the last axis", part)
        (start1, end1, step1), (start2, end2, step2) = _slice(first), _slice(second)
        if (start1, end1, step1) != ([0], [half], 1):
            return fail(f"first half slice {start1}:{end1}:{step1}, expected 0:{half}:1", first)
        if start2 != [half] or not end2 or end2[0] < head_dim or step2 != 1:
            return fail(f"second half slice {start2}:{end2}:{step2}, expected {half}:", second)
        if rotated.producer().attributes.get_int("axis", 0) not in (-1, rank - 1):
            return fail("rotate-half Concat not on the last axis", rotated)
        return ok()

    def rewrite(self, op, x, cos, sin, **_):
        rotary = op.Rotary(x, cos, sin, interleaved=0, _domain=KVFUSE_DOMAIN)
        return like(rotary, x)


class InterleavedRule(Rule):
    """`rotary/interleaved`: rotate-every-two RoPE → kvfuse Rotary(interleaved=1)."""

    def __init__(self) -> None:
        super().__init__("rotary/interleaved")

    def pattern(self, op, x, cos, sin, axis_odd, axis_even, shape):
        odd = op.Slice(x, _allow_other_inputs=True, _outputs=["odd"])
        even = op.Slice(x, _allow_other_inputs=True, _outputs=["even"])
        stacked = op.Concat(
            op.Unsqueeze(op.Neg(odd), axis_odd),
            op.Unsqueeze(even, axis_even),
            _outputs=["stacked"],
        )
        rotated = op.Reshape(stacked, shape, _outputs=["rotated"])
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, odd, even, axis_odd, axis_even, rotated, stacked, **_):
        head_dim = _head_dim(x)
        if head_dim is None:
            return fail(f"rotated tensor {x.name} has no static head dim", x)
        rank = len(x.shape)
        (start_odd, _, step_odd), (start_even, _, step_even) = _slice(odd), _slice(even)
        if (start_odd, step_odd, start_even, step_even) != ([1], 2, [0], 2):
            return fail(
                f"pair slices {start_odd}::{step_odd} and {start_even}::{step_even}, "
                "expected 1::2 and 0::2",
                odd,
                even,
            )
        if _ints(axis_odd) not in ([-1], [rank]) or _ints(axis_even) not in ([-1], [rank]):
            return fail("pairs are not stacked on a new last axis", stacked)
        if rotated.shape is not None and rotated.shape != x.shape:
            return fail(f"stacked pairs reshaped to {rotated.shape}, expected {x.shape}", rotated)
        return ok()

    def rewrite(self, op, x, cos, sin, **_):
        rotary = op.Rotary(x, cos, sin, interleaved=1, _domain=KVFUSE_DOMAIN)
        return like(rotary, x)


class PartialRule(Rule):
    """`rotary/partial`: Concat(Rotary(x[..., :R]), x[..., R:]) → Rotary(x; rotary_dim=R)."""

    def __init__(self) -> None:
        super().__init__("rotary/partial")

    def pattern(self, op, x, cos, sin):
        head = op.Slice(x, _allow_other_inputs=True, _outputs=["head"])
        tail = op.Slice(x, _allow_other_inputs=True, _outputs=["tail"])
        rotated = op.Rotary(head, cos, sin, _domain=KVFUSE_DOMAIN, _outputs=["rotated"])
        return op.Concat(rotated, tail, _outputs=["joined"])

    def check(self, context, x, head, tail, joined, **_):
        head_dim = _head_dim(x)
        if head_dim is None:
            return fail(f"rotated tensor {x.name} has no static head dim", x)
        (start_h, end_h, step_h), (start_t, end_t, step_t) = _slice(head), _slice(tail)
        if start_h != [0] or not end_h or step_h != 1 or start_t != end_h or step_t != 1:
            return fail(
                f"partial RoPE slices {start_h}:{end_h} and {start_t}:{end_t}, expected 0:R and R:",
                head,
                tail,
            )
        if not end_t or end_t[0] < head_dim:
            return fail(f"pass-through slice ends at {end_t}, expected the head dim", tail)
        if joined.producer().attributes.get_int("axis", 0) not in (-1, len(x.shape) - 1):
            return fail("partial RoPE Concat not on the last axis", joined)
        return ok()

    def rewrite(self, op, x, cos, sin, head, rotated, **_):
        rotary_dim = _slice(head)[1][0]
        interleaved = rotated.producer().attributes.get_int("interleaved", 0)
        partial = op.Rotary(
            x, cos, sin, interleaved=interleaved, rotary_dim=rotary_dim, _domain=KVFUSE_DOMAIN
        )
        return like(partial, x)


RULES = [RotateHalfRule.rule(), InterleavedRule.rule(), PartialRule.rule()]
