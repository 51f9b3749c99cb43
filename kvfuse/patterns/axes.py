"""Axis shuffles and single-index selections → the canonical forms the attention rules match.

`layout/swap_last_axes` — a swap of the last two axes written through 3-D reshapes:

    x[B, H, T, D] ─ Reshape([-1, T, D]) ─ Transpose(0, 2, 1) ─ Reshape([B, H, D, T]) ─ y
                                      becomes
    x[B, H, T, D] ─ Transpose(0, 1, 3, 2) ─ y

The dynamo exporter (torch.onnx, `dynamo=True`) decomposes `scaled_dot_product_attention`'s
`key.transpose(-2, -1)` this way for keys of any rank; TorchScript writes the 4-D Transpose
directly. The first Reshape only merges the leading axes (the last two are kept) and the last
one splits them back, so the chain is exactly the axis swap — which the attention rules then
see as the key transpose of Q·Kᵀ. Shapes come from shape inference; dims equal by name
(`past + seq`) are the same size at run time.

`layout/index_as_slice`, `layout/select_before_transpose`, `layout/transpose_pair` — a head
taken out of a fused projection by advanced indexing. Falcon's `qkv[..., [-2], :]` (the
multi-query key) is exported by the dynamo exporter as

    qkv[B, S, N, D] ─ Transpose(2, 0, 1, 3) ─ GatherND([[-2]]) ─ Transpose(1, 0, 2, 3) ─ k

and becomes `Transpose(Slice(qkv, N-2:N-1, axis 2), (0, 2, 1, 3))`: the single-index GatherND
is a Slice of axis 0, the Slice moves before the Transpose that only feeds selections, and the
two Transposes compose. The clean-up's head split then sees the Slice of the projection that
TorchScript exports write directly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvfuse.patterns.norm import _ints
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


class IndexAsSliceRule(Rule):
    """`layout/index_as_slice`: GatherND(x, [[i]]) → Slice(x, i:i+1, axis 0)."""

    def __init__(self) -> None:
        super().__init__("layout/index_as_slice")

    def pattern(self, op, x, indices):
        return op.GatherND(x, indices, _outputs=["selected"])

    def check(self, context, x, indices, selected, **_):
        if selected.producer().attributes.get_int("batch_dims", 0) != 0:
            return fail("GatherND with batch_dims gathers per batch row", selected)
        index = ir.convenience.get_const_tensor(indices)
        if index is None or index.shape != ir.Shape([1, 1]):
            return fail(f"GatherND indices {indices.name} are not one constant [[i]]", indices)
        if x.shape is None or not isinstance(x.shape[0], int):
            return fail(f"gathered axis of {x.name} has no static size: {x.shape}", x)
        return ok()

    def rewrite(self, op, x, indices, selected, **_):
        index = ir.convenience.get_const_tensor(indices).numpy()
        start = int(index.reshape(-1)[0]) % x.shape[0]
        bounds = [
            op.Constant(value=ir.tensor(np.array([v], np.int64))) for v in (start, start + 1, 0)
        ]
        return like(op.Slice(x, *bounds), selected)


class SelectBeforeTransposeRule(Rule):
    """`layout/select_before_transpose`: Slice(Transpose(y, p), axis a) →
    Transpose(Slice(y, axis p[a]), p), when the Transpose feeds only Slices (so it goes) and
    moves the sliced axis. A slice of an axis the Transpose keeps in place (RoPE's halves of
    D, partial RoPE's rotated part) stays where the rotary rules look for it."""

    def __init__(self) -> None:
        # the Transpose stays until its last Slice has moved (then it is dead)
        super().__init__("layout/select_before_transpose", remove_nodes=False)

    def pattern(self, op, y, starts, ends, axes):
        transposed = op.Transpose(y, _outputs=["transposed"])
        return op.Slice(transposed, starts, ends, axes, _allow_other_inputs=True, _outputs=["cut"])

    def check(self, context, transposed, axes, cut, **_):
        users = {user.op_type for user, _ in transposed.uses()}
        if users != {"Slice"} or transposed.is_graph_output():
            return fail(f"transpose {transposed.name} also feeds {sorted(users)}", transposed)
        steps = cut.producer().inputs[4] if len(cut.producer().inputs) > 4 else None
        if len(_ints(axes) or []) != 1 or (steps is not None and _ints(steps) != [1]):
            return fail(f"slice {cut.name} is not one axis with step 1", cut)
        perm = list(transposed.producer().attributes.get_ints("perm", []))
        axis = _ints(axes)[0] % len(perm) if perm else None
        if axis is None or perm[axis] == axis:
            return fail(f"slice of axis {axis}, which transpose {perm} keeps in place", cut)
        return ok()

    def rewrite(self, op, y, starts, ends, axes, transposed, cut, **_):
        perm = list(transposed.producer().attributes.get_ints("perm"))
        axis = perm[_ints(axes)[0] % len(perm)]
        source_axis = op.Constant(value=ir.tensor(np.array([axis], np.int64)))
        return like(op.Transpose(op.Slice(y, starts, ends, source_axis), perm=perm), cut)


class TransposePairRule(Rule):
    """`layout/transpose_pair`: Transpose(Transpose(x, p), q) → Transpose(x, p∘q)."""

    def __init__(self) -> None:
        super().__init__("layout/transpose_pair", remove_nodes=False)  # inner may have other users

    def pattern(self, op, x):
        inner = op.Transpose(x, _outputs=["inner"])
        return op.Transpose(inner, _outputs=["outer"])

    def check(self, context, inner, outer, **_):
        for value in (inner, outer):
            if not value.producer().attributes.get_ints("perm"):
                return fail(f"transpose {value.name} has no explicit perm", value)
        return ok()

    def rewrite(self, op, x, inner, outer, **_):
        first = list(inner.producer().attributes.get_ints("perm"))
        second = list(outer.producer().attributes.get_ints("perm"))
        perm = [first[axis] for axis in second]
        if perm == sorted(perm):
            return op.Identity(x)
        return like(op.Transpose(x, perm=perm), outer)


RULES = [
    SwapLastAxesRule.rule(),
    IndexAsSliceRule.rule(),
    SelectBeforeTransposeRule.rule(),
    TransposePairRule.rule(),
]
