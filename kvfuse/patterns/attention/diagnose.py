"""Why did this Softmax not become attention? A plain-words walk of its neighbourhood.

The matcher's own failure for a pattern with alternatives is often "none of the alternatives
matched". For every Softmax left after fusion this module walks the usual attention chain and
names the first constraint that does not hold, with the nodes involved:

    MatMul(q, [scale] Transpose(k)) ─ [scale] ─ [mask] ─ [Cast] ─ Softmax ─ [guard] ─ MatMul(·, v)

(or MatMul(q, [scale] k) with k already [B, H, D, T]: a key cached pre-transposed.)
"""

from __future__ import annotations

import onnx_ir as ir

from kvfuse.patterns.attention import batched_heads
from kvfuse.rewriter.layout import LAYOUTS
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, NearMiss

# a scale, mask, cast, soft-capping (Tanh), sink column (Concat) or its max subtraction (Sub)
PASS_THROUGH = ("Cast", "Add", "Mul", "Div", "Where", "Tanh", "Concat", "Sub")


def diagnose_softmax(softmax: ir.Node) -> NearMiss | None:
    """The first attention constraint this Softmax's neighbourhood breaks, or None (also for a
    kvfuse Attention left unfused with its cache: see `diagnose_cached`)."""
    if softmax.domain == KVFUSE_DOMAIN and softmax.op_type == "Attention":
        return diagnose_cached(softmax)
    checks = (_axis, _single_use, _scores_matmul, _key_transpose, _value_head_dim, _values_matmul)
    for check in checks:
        reason = check(softmax)
        if reason is not None:
            text, culprits = reason
            return NearMiss(
                "attention/sdpa (diagnosis)",
                softmax.name or "Softmax",
                0,
                text,
                [c.name or c.op_type for c in culprits],
            )
    return None


def _axis(softmax):
    axis = softmax.attributes.get_int("axis", -1)
    rank = len(softmax.outputs[0].shape) if softmax.outputs[0].shape is not None else 4
    if axis not in (-1, rank - 1):
        return f"Softmax over axis {axis}, expected the last (keys) axis", [softmax]
    return None


def _single_use(softmax):
    value = softmax.outputs[0]
    if value.is_graph_output():
        return f"attention probabilities {value.name} are also a graph output", [softmax]
    users = [user for user, _ in value.uses()]
    if len(users) > 2 or (len(users) == 2 and {u.op_type for u in users} != {"IsNaN", "Where"}):
        if len(users) == 1 or {u.op_type for u in users} == {"Slice"}:
            return None
        kinds = ", ".join(sorted(u.op_type for u in users))
        return f"attention probabilities feed {kinds}, expected only the V MatMul", users
    return None


def _scores_matmul(softmax):
    node = _walk_up(softmax.inputs[0])
    if node is not None and node.op_type == "Reshape" and _batched_heads(node):
        why = batched_heads.scores_left_batched(node) or (
            "the ops between that MatMul and the reshape are not baddbmm's α·Q·Kᵀ + bias"
        )
        return (
            "scores come from a [B·H, S, T] batched MatMul reshaped to [B, H, S, T] (heads "
            "merged into the batch, as Bloom's baddbmm does) that layout/heads_from_batch did "
            f"not unfold: {why}",
            [node],
        )
    if node is None or node.op_type != "MatMul":
        found = node.op_type if node is not None else "a graph input"
        return f"Softmax input comes from {found}, expected the Q·Kᵀ MatMul", [softmax]
    return None


def _key_transpose(softmax):
    matmul = _walk_up(softmax.inputs[0])
    key = _walk_up(matmul.inputs[1], through=("Mul", "Div"))
    if key is None or key.op_type != "Transpose":
        query_dim, key_dim = _last_dim(matmul.inputs[0]), _dim(matmul.inputs[1], -2)
        if query_dim is not None and key_dim == query_dim:
            return None  # k is [.., D, T] already: a key cached pre-transposed
        found = key.op_type if key is not None else "a graph input"
        return (
            f"Q·Kᵀ takes its key from {found}, expected a Transpose of K or a key cached as "
            f"[B, H, D, T] (found key dims {matmul.inputs[1].shape})",
            [matmul],
        )
    perm = list(key.attributes.get_ints("perm", []))
    expected = {tuple(layout.key_transposed): layout.name for layout in LAYOUTS}
    if tuple(perm) not in expected:
        options = ", ".join(f"{list(p)} ({name})" for p, name in expected.items())
        return f"key transpose perm {perm}, expected one of {options}", [key]
    return None


def _value_head_dim(softmax):
    matmul = _walk_up(softmax.inputs[0])
    query_dim = _last_dim(matmul.inputs[0])
    consumers = [u for u, _ in softmax.outputs[0].uses()]
    for user in consumers + [u for c in consumers for u, _ in c.outputs[0].uses()]:
        if user.op_type == "MatMul":
            value_dim = _last_dim(user.inputs[1])
            if None not in (query_dim, value_dim) and value_dim != query_dim:
                return (
                    f"value head dim {value_dim} differs from query head dim {query_dim}",
                    [user],
                )
    return None


def _values_matmul(softmax):
    probs = softmax.outputs[0]
    users = [user for user, _ in probs.uses()]
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:  # NaN guard
        probs = next(u for u in users if u.op_type == "Where").outputs[0]
    why = batched_heads.values_left_batched(probs)
    if why is None:
        return None
    return (
        "probabilities × V is a [B·H, S, D] batched MatMul (heads merged into the batch, as "
        f"Bloom's bmm does) that layout/heads_from_batch_v did not unfold: {why}",
        [softmax],
    )


def _walk_up(value: ir.Value | None, through=PASS_THROUGH) -> ir.Node | None:
    """The first producer above `value` that is not a scale, mask, cast or guard."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in through:
        value = node.inputs[1] if node.op_type == "Where" else node.inputs[0]
        node = value.producer() if value is not None else None
    return node


def _last_dim(value: ir.Value | None) -> int | None:
    return _dim(value, -1)


def _dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or len(value.shape) < -axis:
        return None
    return value.shape[axis] if isinstance(value.shape[axis], int) else None


def _batched_heads(reshape: ir.Node) -> bool:
    """Whether a Reshape to 4-D lifts a 3-D MatMul product (possibly scaled/biased)."""
    source = _walk_up(reshape.inputs[0])
    value = source.outputs[0] if source is not None else None
    return (
        source is not None
        and source.op_type == "MatMul"
        and value.shape is not None
        and len(value.shape) == 3
    )


def diagnose_cached(attention: ir.Node) -> NearMiss | None:
    """Why an attention core (already fused) did not fuse with its KV cache: the first
    projection path that is not Reshape → [Transpose] → [Rotary] → Concat(past, ·)."""
    query = attention.inputs[0]
    node = query.producer() if query is not None else None
    while node is not None and node.op_type == "Transpose":
        node = node.inputs[0].producer()
    if node is not None and node.op_type not in ("Reshape", "Rotary"):
        return NearMiss(
            "attention/cached (diagnosis)",
            attention.name or "Attention",
            0,
            f"the query reaches attention through {node.op_type} after its projection "
            "reshape: a rotation or transform the rotary rules did not fuse (an unrecognised "
            "RoPE formulation?), so the layer's cache is not matched",
            [node.name or node.op_type],
        )
    return None
