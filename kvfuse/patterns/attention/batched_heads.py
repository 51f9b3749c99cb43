"""Attention with the heads folded into the batch → the [B, H, …] products the core rule matches.

Legend: B batch, H heads, S new tokens, T total positions, D head dim; N = B·H.

Bloom computes its scores with `baddbmm` over 3-D tensors, heads merged into the batch axis,
the ALiBi bias riding in the same call (β·alibi + α·Q·Kᵀ), and only then views them as
[B, H, S, T] for the mask and the softmax; its probabilities go back to [N, S, T] for the
batched product with V:

    q[B,H,S,D] ─ Reshape[N,S,D] ──────────────────────┐
    k[B,H,T,D] ─ Reshape[N,T,D] ─ Transpose(0, 2, 1) ─ MatMul ─ [·α] ─ [+ bias[N,·,T]]
        ─ Reshape[B,H,S,T] ─ scores                                    (`layout/heads_from_batch`)
    probs[B,H,S,T] ─ Reshape[N,S,T] ─┐
    v[B,H,T,D] ─ Reshape[N,T,D] ───── MatMul ─ Reshape[B,H,S,D] ─ out  (`layout/heads_from_batch_v`)

become the same products over [B, H, …] (the bias split back to [B, H, ·, T] before it is
added), which is `attention/sdpa_bhsd` with a scale and an additive position bias. The merged
reshapes only join B and H (the last two axes are kept) and the final ones split them back in
the same order, so each chain is exactly the 4-D product. What a merge joins is read from
what its target computes (`merged_heads`), so Optimum's and the dynamo exporter's Bloom match
alike; where a merge joins anything else, `scores_left_batched` / `values_left_batched` say
which, for the Softmax's diagnosis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import optimizer
from onnxscript.rewriter import pattern

from kvfuse.patterns.attention.merged_heads import (
    dim,
    dims,
    factors,
    front_factors,
    merges_heads,
    same_product,
    split_heads,
)
from kvfuse.patterns.attention.sdpa import scaled
from kvfuse.rewriter.rules import Rule, apply_rules, fail, like, ok


class ScoresFromBatchRule(Rule):
    """`layout/heads_from_batch`: [N, S, T] scores (with scale and bias) viewed as [B,H,S,T]."""

    def __init__(self) -> None:
        # the mask builder reads shapes of the merged key: the old chain dies with the mask
        super().__init__("layout/heads_from_batch", remove_nodes=False)

    def pattern(self, op, query, key, qk_scale, bias):
        q_merged = op.Reshape(
            query, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["q_merged"]
        )
        k_merged = op.Reshape(
            key, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["k_merged"]
        )
        scores = op.MatMul(q_merged, op.Transpose(k_merged, perm=[0, 2, 1]))
        scores = scaled(op, scores, qk_scale, "qk_how")
        scores = pattern.OrValue(
            [op.Add(scores, bias), scores], tag_var="biased", tag_values=[1, 0]
        )
        return op.Reshape(
            scores, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["split"]
        )

    def check(self, context, query, key, q_merged, k_merged, split, **bound):
        bias = bound["bias"] if bound["biased"] else None
        failure = _scores_failure(query, key, q_merged, k_merged, split, bias)
        return ok() if failure is None else fail(*failure)

    def rewrite(self, op, query, key, split, qk_scale=None, bias=None, **bound):
        scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2]))
        if bound["qk_how"] != "none":
            scores = getattr(op, bound["qk_how"].capitalize())(scores, qk_scale)
        if bound["biased"]:
            scores = op.Add(scores, _bias_by_head(op, bias, split_heads(split, query)))
        return like(scores, split)


def _scores_failure(query, key, q_merged, k_merged, split, bias) -> tuple | None:
    """(reason, culprit) why the scores chain is not the [B, H, S, T] product, or None."""
    heads_of = split_heads(split, query)
    if heads_of is None:
        return f"scores reshaped to {split.shape}, not [B, H, S, T] with known B, H", split
    for source, merged in ((query, q_merged), (key, k_merged)):
        reason = merges_heads(source, merged, heads_of)
        if reason is not None:
            return reason, merged
    if dims(split)[2] != dims(query)[2]:
        return f"scores {split.shape} split back with other rows than {query.shape}", split
    if bias is not None and (dims(bias) is None or len(dims(bias)) != 3):
        return f"score bias {bias.name} {dims(bias)} is not [B·H | 1, ·, T]", bias
    return None


def scores_left_batched(split: ir.Node) -> str | None:
    """Why `layout/heads_from_batch` left the Reshape `split` of batched scores as it is, in
    words (what its merging reshapes join), or None if the chain is not that rule's shape:
    split ← [Add(bias)] ← [Mul|Div] ← MatMul(Reshape(q), Transpose(Reshape(k)))."""
    node, bias = split.inputs[0].producer(), None
    if node is not None and node.op_type == "Add":
        node, bias = _operand(node, ("Mul", "Div", "MatMul"))
    if node is not None and node.op_type in ("Mul", "Div"):
        node, _ = _operand(node, ("MatMul",))
    if node is None or node.op_type != "MatMul":
        return None
    q_merged, key_t = node.inputs
    transpose = key_t.producer()
    k_merged = transpose.inputs[0] if transpose and transpose.op_type == "Transpose" else None
    merges = [v.producer() if v is not None else None for v in (q_merged, k_merged)]
    if any(m is None or m.op_type != "Reshape" for m in merges):
        return None
    sources = [m.inputs[0] for m in merges]
    failure = _scores_failure(*sources, q_merged, k_merged, split.outputs[0], bias)
    return failure[0] if failure is not None else None


def _operand(node: ir.Node, op_types: tuple) -> tuple:
    """(the producer among `op_types` of one of `node`'s two inputs, the other input)."""
    for mine, other in (node.inputs, node.inputs[::-1]):
        if mine is not None and mine.producer() is not None:
            if mine.producer().op_type in op_types:
                return mine.producer(), other
    return None, None


def _bias_by_head(op, bias: ir.Value, heads_of: list) -> ir.Value:
    """bias [B·H, a, T] → [B, H, a, T] (a [1, a, T] bias → [1, 1, a, T], broadcast as before)."""
    if dim(bias.shape[0]) == 1:
        return op.Unsqueeze(bias, op.Constant(value=ir.tensor(np.array([0], np.int64))))
    rest = op.Shape(bias, start=1)
    front = op.Constant(value=ir.tensor(np.array([-1, heads_of[1]], np.int64)))
    return op.Reshape(bias, op.Concat(front, rest, axis=0))


class ValuesFromBatchRule(Rule):
    """`layout/heads_from_batch_v`: probabilities × V over [N, …], split back to [B,H,S,D]."""

    def __init__(self) -> None:
        super().__init__("layout/heads_from_batch_v", remove_nodes=False)

    def pattern(self, op, probs, value):
        p_merged = op.Reshape(
            probs, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["p_merged"]
        )
        v_merged = op.Reshape(
            value, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["v_merged"]
        )
        return op.Reshape(
            op.MatMul(p_merged, v_merged),
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=["split"],
        )

    def check(self, context, probs, value, p_merged, v_merged, split, **_):
        failure = _values_failure(probs, value, p_merged, v_merged, split)
        return ok() if failure is None else fail(*failure)

    def rewrite(self, op, probs, value, split, **_):
        return like(op.MatMul(probs, value), split)


def _values_failure(probs, value, p_merged, v_merged, split) -> tuple | None:
    """(reason, culprit) why the P·V chain is not the [B, H, S, D] product, or None."""
    heads_of = split_heads(split, value)
    if heads_of is None:
        return f"attention output reshaped to {split.shape}, not [B, H, S, D]", split
    reason = merges_heads(value, v_merged, heads_of)
    if reason is not None:
        return reason, v_merged
    found, into = dims(probs), dims(p_merged)
    if found is None or len(found) != 4 or found[1] != heads_of[1]:
        return f"probabilities {probs.name} {found} are not [B, H, S, T]", probs
    front = front_factors(p_merged.producer().inputs[1])
    if into is None or len(into) != 3 or not same_product(front, factors(heads_of)):
        return f"probabilities merged to {into}, expected [B·H, S, T]", p_merged
    return None


def values_left_batched(probs: ir.Value) -> str | None:
    """Why `layout/heads_from_batch_v` left the batched product of `probs` with V as it is, in
    words, or None if there is none: probs ─ Reshape ─ MatMul(·, Reshape(v)) ─ Reshape."""
    for merge, _ in probs.uses():
        uses = merge.outputs[0].uses() if merge.op_type == "Reshape" else []
        for matmul, index in uses:
            v_merge = matmul.inputs[1].producer() if matmul.op_type == "MatMul" else None
            if index != 0 or v_merge is None or v_merge.op_type != "Reshape":
                continue
            splits = [u for u, _ in matmul.outputs[0].uses() if u.op_type == "Reshape"]
            if splits:
                merged = (merge.outputs[0], matmul.inputs[1], splits[0].outputs[0])
                failure = _values_failure(probs, v_merge.inputs[0], *merged)
                return failure[0] if failure is not None else None
    return None


RULES = [ScoresFromBatchRule.rule(), ValuesFromBatchRule.rule()]


def unfold_heads(model: ir.Model) -> dict[str, int]:
    """Apply both rules, then drop the merged chains: their outputs' shapes are still read by
    the model's shape plumbing (Bloom's `_merge_heads` takes B from the [B·H, S, D] product),
    so each such reader is given a free view of the new [B, H, S, D] product instead."""
    counts = apply_rules(model, RULES)
    if any(counts.values()):
        for node in list(model.graph):
            _rehome_shape_readers(model.graph, node)
        optimizer.remove_unused_nodes(model)
    return counts


def _rehome_shape_readers(graph: ir.Graph, old: ir.Node) -> None:
    """`old` a merged MatMul(Reshape(a), Reshape(b)) read only by Shape nodes, with the
    unfolded MatMul(a, b) beside it: its readers read Reshape(new, [-1, S, D]) instead."""
    if old.op_type != "MatMul" or old.outputs[0].is_graph_output():
        return
    readers = [user for user, _ in old.outputs[0].uses()]
    merged = [v.producer() for v in old.inputs]
    if not readers or any(user.op_type != "Shape" for user in readers):
        return
    if any(m is None or m.op_type != "Reshape" for m in merged):
        return
    sources = [m.inputs[0] for m in merged]
    twin = next(
        (
            user
            for user, _ in sources[0].uses()
            if user.op_type == "MatMul" and list(user.inputs) == sources
        ),
        None,
    )
    if twin is None:
        return
    front = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-1], np.int64))})
    rest = ir.node("Shape", [twin.outputs[0]], attributes={"start": 2})
    target = ir.node("Concat", [front.outputs[0], rest.outputs[0]], attributes={"axis": 0})
    view = ir.node("Reshape", [twin.outputs[0], target.outputs[0]])
    view.outputs[0].dtype = old.outputs[0].dtype
    view.outputs[0].shape = old.outputs[0].shape
    graph.insert_after(twin, [front, rest, target, view])
    old.outputs[0].replace_all_uses_with(view.outputs[0])
