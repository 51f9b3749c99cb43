"""A fused projection split after an Unsqueeze → split first, heads reshaped per part.

Legend: B batch, S new tokens, H heads, D head dim, W = (H + 2)·D the fused width.

transformers' GPTBigCode (multi-query: one key and one value head) adds a head axis to its one
c_attn projection and splits that:

    c_attn [B, S, W] ─ Unsqueeze(1) ─ [B, 1, S, W] ─ Split(axis 3: H·D, D, D)
        ├─ query [B, 1, S, H·D] ─ Reshape [B, S, H, D] ─ …
        ├─ key   [B, 1, S, D] ─ Concat(past_key, ·) …    (already [B, Hkv=1, S, D])
        └─ value [B, 1, S, D] ─ Concat(past_value, ·) …

which is the same as splitting [B, S, W] on its last axis into flat projections, then reshaping
each into heads as every other family does (the key/value part: [B, S, 1, D], transposed to
[B, 1, S, D]). After this pass the attention rules see that usual form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvfuse.rewriter.rules import add_constant, take_over
from kvfuse.rewriter.shapes import symbolic_ints


def split_unsqueezed_projections(model: ir.Model) -> dict[str, int]:
    """`shape/unsqueezed_split`: Split(Unsqueeze(x [B, S, W], 1), axis 3) → Split(x, axis 2)
    with each part given its head axis back (Reshape into heads + Transpose)."""
    graph, count = model.graph, 0
    for split in [n for n in graph if n.op_type == "Split"]:
        unsqueeze = split.inputs[0].producer()
        if not _is_head_unsqueeze(unsqueeze) or split.attributes.get_int("axis", 0) not in (3, -1):
            continue
        flat = unsqueeze.inputs[0]
        flat_split = ir.node(
            "Split",
            [flat, *split.inputs[1:]],
            attributes={"axis": 2},
            num_outputs=len(split.outputs),
            name=f"{split.name}/flat",
        )
        graph.insert_before(split, flat_split)
        for old, part in zip(split.outputs, flat_split.outputs, strict=True):
            part.dtype = old.dtype or flat.dtype
            if old.shape is not None:  # [B, 1, S, n] → [B, S, n]
                part.shape = ir.Shape([old.shape[0], *old.shape[2:]])
            if old.uses() and all(_reads_only_dims(user, old) for user, _ in old.uses()):
                for user, index in list(old.uses()):
                    user.replace_input_with(index, part)  # the query, reshaped into heads
            else:
                take_over(graph, old, _as_heads(graph, split, part, old))
        count += 1
    return {"shape/unsqueezed_split": count}


def _is_head_unsqueeze(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Unsqueeze" or len(node.inputs) < 2:
        return False
    axes = node.inputs[1].const_value
    flat = node.inputs[0]
    return (
        axes is not None
        and [int(a) for a in axes.numpy().reshape(-1)] == [1]
        and flat.shape is not None
        and len(flat.shape) == 3
        and isinstance(flat.shape[-1], int)
    )


def _reads_only_dims(user: ir.Node, old: ir.Value) -> bool:
    """Whether `user` is a Reshape of `old` whose result does not depend on `old`'s rank: no
    0 ("copy this dim") in its target except the batch's (allowzero off)."""
    if user.op_type != "Reshape" or user.inputs[0] is not old:
        return False
    if user.attributes.get_int("allowzero", 0) == 1:
        return True
    dims = symbolic_ints(user.inputs[1])
    return dims is not None and 0 not in dims[1:]


def _as_heads(graph: ir.Graph, anchor: ir.Node, part: ir.Value, old: ir.Value) -> ir.Value:
    """[B, S, n] → [B, 1, S, n] as Reshape [B, S, 1, n] then Transpose (one head)."""
    width = old.shape[-1] if old.shape is not None else -1
    target = add_constant(graph, anchor, np.array([0, 0, 1, width], dtype=np.int64))
    reshape = ir.node("Reshape", [part, target], name=f"{anchor.name}/{part.name}_heads")
    transpose = ir.node(
        "Transpose",
        [reshape.outputs[0]],
        attributes={"perm": [0, 2, 1, 3]},
        name=f"{anchor.name}/{part.name}_to_bhsd",
    )
    graph.insert_before(anchor, [reshape, transpose])
    out = transpose.outputs[0]
    out.dtype = part.dtype
    if old.shape is not None:
        out.shape = ir.Shape(old.shape)
    return out
