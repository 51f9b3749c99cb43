"""GQA/MQA head repeat → kvfuse RepeatKV(x; repeats, axis).

Legend: Hkv kv heads, n = H / Hkv repeats. transformers' `repeat_kv` gives each kv head n
consecutive copies (not a tiled block), which exporters write as

    x[.., Hkv, ..] ─ Unsqueeze(head+1) ─ Expand(.., Hkv, n, ..) | Tile(1,..,n,..)
                   ─ Reshape(.., Hkv·n, ..)
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from kvfuse.patterns.norm import _ints
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, Rule, fail, like, ok


class RepeatKVRule(Rule):
    """`attention/repeat_kv`: Unsqueeze + Expand/Tile + Reshape → kvfuse RepeatKV."""

    def __init__(self) -> None:
        # remove_nodes=False: Falcon's exporter reads the expanded tensor's shape to build the
        # Reshape target; that read dies with the Reshape once the repeat is replaced
        super().__init__("attention/repeat_kv", remove_nodes=False)

    def pattern(self, op, x, axes, shape, target):
        unsqueezed = op.Unsqueeze(x, axes)
        expanded = pattern.OrValue(
            [op.Expand(unsqueezed, shape), op.Tile(unsqueezed, shape)],
            tag_var="repeat_how",
            tag_values=["expand", "tile"],
        )
        return op.Reshape(expanded, target, _outputs=["repeated"])

    def check(self, context, x, axes, repeated, **_):
        if x.shape is None or repeated.shape is None or len(x.shape) != len(repeated.shape):
            return fail(f"shapes of {x.name} and its repeat are unknown or of different rank", x)
        unsqueeze_axis = (_ints(axes) or [None])[0]
        if unsqueeze_axis is None or unsqueeze_axis < 1:
            return fail(f"Unsqueeze axes {_ints(axes)}, expected one axis after the head axis", x)
        head_axis = unsqueeze_axis - 1
        before, after = x.shape[head_axis], repeated.shape[head_axis]
        if not (isinstance(before, int) and isinstance(after, int)) or after % before:
            return fail(f"heads {before} → {after} is not a whole repeat", x, repeated)
        for axis, (a, b) in enumerate(zip(x.shape, repeated.shape, strict=True)):
            if axis != head_axis and a != b and isinstance(a, int) and isinstance(b, int):
                return fail(f"repeat changes axis {axis} ({a} → {b}), not only heads", repeated)
        return ok()

    def rewrite(self, op, x, axes, repeated, **_):
        head_axis = _ints(axes)[0] - 1
        repeats = repeated.shape[head_axis] // x.shape[head_axis]
        repeated_kv = op.RepeatKV(x, repeats=repeats, axis=head_axis, _domain=KVFUSE_DOMAIN)
        return like(repeated_kv, repeated)


RULES = [RepeatKVRule.rule()]
