"""Reading reshapes that merge the heads into the batch axis: which dims a merge joins.

Legend: B batch, H heads; N = B·H. A merge [B, H, a, b] → [N, a, b] is recognised by what its
target computes, whichever exporter wrote it: a constant N; Optimum's `batch_size · num_heads`
as Mul(Gather(Shape(x), 0), H); the dynamo exporter's Mul(Squeeze(Shape(y)[0:1]), H) with y any
tensor of the same batch. Products are compared as (static part, sorted symbols).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvfuse.rewriter import shapes


def dim(d):
    """A dim as an int, a symbol name, or None."""
    return d if isinstance(d, int) else getattr(d, "value", None)


def dims(value: ir.Value) -> list | None:
    """The dims of `value` (see `dim`), or None if its shape is unknown."""
    return None if value.shape is None else [dim(d) for d in value.shape]


def merges_heads(source: ir.Value, merged: ir.Value, heads_of: list) -> str | None:
    """Why `merged` is not `source` [B, H, a, b] with B and H joined into one axis (None if it
    is). `heads_of` is [B, H] as the split-back result has them."""
    found, into = dims(source), dims(merged)
    if found is None or into is None or len(found) != 4 or len(into) != 3:
        return f"{source.name} {found} reshaped to {into}, expected [B, H, a, b] → [B·H, a, b]"
    front = front_factors(merged.producer().inputs[1])
    same_batch = found[0] == heads_of[0] or _unknown(found[0]) or _unknown(heads_of[0])
    if not same_batch or found[1] != heads_of[1] or not same_product(front, factors(heads_of)):
        return f"{source.name} {found} merged to {into}, expected [B, H] = {heads_of} joined"
    # B·H first and the last axis kept: the element count leaves the middle axis as it was
    if into[2] is None or into[2] != found[3]:
        return f"{source.name} {found} merged to {into}: its last axis is not kept"
    return None


def factors(dims: list) -> tuple | None:
    """A product of dims as (static product, sorted symbols), or None if one is unknown."""
    if any(d is None for d in dims):
        return None
    number = int(np.prod([d for d in dims if isinstance(d, int)], dtype=np.int64))
    return number, tuple(sorted(d for d in dims if isinstance(d, str)))


def same_product(a: tuple | None, b: tuple | None) -> bool:
    """Two products of dims that are the same size at run time: equal static parts, symbols
    equal or one of them a name shape inference made up for the same batch axis."""
    if a is None or b is None or a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(x == y or _unknown(x) or _unknown(y) for x, y in zip(a[1], b[1], strict=True))


def front_factors(target: ir.Value) -> tuple | None:
    """The first element of a Reshape target as a product of dims (Bloom writes it as
    `batch_size · num_heads`: Mul(Gather(Shape(x), 0), H)), or None if it cannot be read."""
    node = target.producer()
    if target.const_value is not None:
        first = int(target.const_value.numpy().reshape(-1)[0])
        return factors([first]) if first > 0 else None
    if node is None or node.op_type != "Concat" or not node.inputs:
        return None
    return _product(node.inputs[0])


def _product(value: ir.Value) -> tuple | None:
    """A scalar shape value as a product of dims, read through its computation."""
    scalar = shapes.symbolic_scalar(value)
    if scalar is not None:
        return factors([scalar])
    node = value.producer()
    if node is not None and node.op_type == "Shape":  # the dynamo export: Shape(x)[0:1]
        dims = shapes.symbolic_ints(value)
        return factors(dims) if dims is not None and len(dims) == 1 else None
    if node is not None and node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return _product(node.inputs[0])
    if node is None or node.op_type != "Mul":
        return None
    parts = [_product(v) for v in node.inputs]
    if None in parts:
        return None
    return parts[0][0] * parts[1][0], tuple(sorted(parts[0][1] + parts[1][1]))


def split_heads(result: ir.Value, source: ir.Value) -> list | None:
    """[B, H] of `source` [B, H, a, b] (H static) if `result` splits them back: its H equal,
    its B equal or unknown to shape inference (the merged reshapes prove it is B·H / H)."""
    into, found = dims(result), dims(source)
    if into is None or found is None or len(into) != 4 or len(found) != 4:
        return None
    batch, heads = found[:2]
    if batch is None or not isinstance(heads, int) or into[1] != heads:
        return None
    return found[:2] if into[0] in (batch, None) or _unknown(into[0]) else None


def _unknown(dim) -> bool:
    """A fresh symbol of ONNX shape inference: a dim it could not name."""
    return isinstance(dim, str) and dim.startswith("unk__")
