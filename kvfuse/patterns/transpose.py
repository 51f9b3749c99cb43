"""A swap of the last two axes written through 3-D reshapes → one 4-D Transpose.

    x[B, H, T, D] ─ Reshape([-1, T, D]) ─ Transpose(0, 2, 1) ─ Reshape([B, H, D, T]) ─ y
                                      becomes
    x[B, H, T, D] ─ Transpose(0, 1, 3, 2) ─ y

The dynamo exporter (torch.onnx, `dynamo=True`) decomposes `scaled_dot_product_attention`'s
`key.transpose(-2, -1)` this way for keys of any rank; TorchScript writes the 4-D Transpose
directly. The first Reshape only merges the leading axes (the last two are kept) and the last
one splits them back, so the chain is exactly the axis swap — which the attention rules then
see as the key transpose of Q·Kᵀ. Shapes come from shape inference; dims equal by name
(`past + seq`) are the same size at run time.
"""

from __future__ import annotations

from kvfuse.rewriter.rules import Rule, fail, like, ok


def _dim(d) -> int | str | None:
    return d if isinstance(d, int) else getattr(d, "value", None)


def _dims(value) -> list | None:
    """The value's dims as ints or symbol names, or None if any is unknown."""
    if value.shape is None:
        return None
    dims = [_dim(d) for d in value.shape]
    return None if any(d is None for d in dims) else dims


class SwapLastAxesRule(Rule):
    """`layout/swap_last_axes`: Reshape → 3-D Transpose(0, 2, 1) → Reshape → Transpose."""

    def __init__(self) -> None:
        super().__init__("layout/swap_last_axes")

    def pattern(self, op, x, merged_shape, split_shape):
        merged = op.Reshape(x, merged_shape, _allow_other_attributes=True, _outputs=["merged"])
        swapped = op.Transpose(merged, perm=[0, 2, 1], _outputs=["swapped"])
        return op.Reshape(swapped, split_shape, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, merged, y, **_):
        source, middle, result = _dims(x), merged.shape, _dims(y)
        if source is None or result is None or len(source) < 3:
            return fail(f"shapes of {x.name} or {y.name} not fully known: {x.shape}, {y.shape}", x)
        if middle is None or len(middle) != 3:
            return fail(f"merged shape {middle} is not [N, a, b]", merged)
        kept = [_dim(d) for d in middle[1:]]
        if kept != source[-2:]:
            return fail(f"reshape to {middle} does not keep the last two axes {source[-2:]}", x)
        expected = [*source[:-2], source[-1], source[-2]]
        if result != expected:
            return fail(f"split back to {result}, expected {expected}", y)
        return ok()

    def rewrite(self, op, x, y, **_):
        rank = len(x.shape)
        perm = [*range(rank - 2), rank - 1, rank - 2]
        return like(op.Transpose(x, perm=perm), y)


RULES = [SwapLastAxesRule.rule()]
