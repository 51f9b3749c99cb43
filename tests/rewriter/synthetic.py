"""Hand-built one-layer causal LMs with a Concat KV cache, in any layout, for rule tests.

    input_ids ─ Gather(embed) ─ [Transpose → S,B,E] ─ q/k/v MatMul ─ Reshape(proj) ─ [Transpose → L]
      ─ RoPE(position_ids) on q, k ─ Concat(past, ·, S axis of L) ═ present.0.*
      ─ repeat kv heads (Unsqueeze, Expand, Reshape) ─ Q·Kᵀ (scaled) + causal mask ─ Softmax
      ─ ·V ─ Transpose → proj ─ Reshape ─ o_proj MatMul ─ + residual ─ lm_head ─ logits

The layout L is the cache layout ("BHSD" like Optimum, "BSHD", or "SBHD" sequence-first), and
options vary what the rules must absorb: where the scale sits, whether K/V heads repeat, where
RoPE is applied, whether K is cached pre-transposed ([B, Hkv, D, T], read by Q·K as it is).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from kvfuse.rewriter.layout import Layout, is_identity

VOCAB, HIDDEN, HEADS = 64, 64, 4


class _Graph:
    """Tiny helper: add nodes with fresh names, keep initializers."""

    def __init__(self, seed: int) -> None:
        self.nodes, self.inits, self.rng, self.count = [], [], np.random.default_rng(seed), 0

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        node_name = name or f"/model/layers.0/{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], node_name, **attrs))
        return out

    def const(self, array, dtype=np.float32) -> str:
        name = f"c_{len(self.inits)}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.normal(0, 0.2, shape))


def build_lm(
    layout: str = "BHSD",
    kv_heads: int = 2,
    scale: str = "split",
    mask: str = "add",
    rope: str = "half",
    head_dim: int = 16,
    seed: int = 0,
    repeat: str = "after_cache",
    key_cache: str = "layout",
    rope_at: str = "cache",
    scores: str = "plain",
    rotary_dim: int | None = None,
    positions: str = "ids",
    qk_norm: str | None = None,
    flatten: str = "constant",
    qk_norm_at: str = "before",
):
    """One attention layer LM; `scale` is "split" (√s on q and kᵀ), "qk" or "div"; `mask`
    is "add" (additive −inf mask) or "where" (Where(allowed, scores, −inf)); `rope` is
    "half" (rotate-half), "interleaved" (rotate every two) or "partial" (half the head dim);
    `repeat` says where kv heads are repeated to every query head: "after_cache" (Llama),
    "before_cache" (Falcon's new_decoder_architecture: the cache holds every head) or "mixed"
    (keys before, values after: no real model, a negative case); `key_cache` is "layout" (K
    cached like V) or "transposed" (K cached as [B, Hkv, D, T], concatenated on axis -1, and
    Q·K reads it with no transpose); `rope_at` is "cache" (RoPE after the transpose into L) or
    "projection" (on [B, S, H, D], then one transpose straight into the cache order); `scores`
    modifies the scores (see `SCORE_MODIFIERS`).

    Rotary variants: `rotary_dim` rotates only the first R dims in either style (partial);
    `positions` says how the cos/sin builder finds the positions: "ids" (computed from
    position_ids), "table" (rows of a cached [max_positions, R] table gathered by
    position_ids, GPT-J) or "shapes" (Range(past length, past + new) from the shapes of the
    past key and the embeddings, Gemma's Optimum export: no position_ids input at all);
    `qk_norm` ("rms" or "layer") normalises Q and K per head after the head reshape, before
    RoPE (Qwen3) — or, with `qk_norm_at="after"`, after it (a negative case); `flatten` is
    how the interleaved pairs are flattened back: a "constant" Reshape target or one built
    from the stacked tensor's "shape" (GPT-J's flatten(-2))."""
    global HEAD_DIM
    HEAD_DIM = head_dim
    scores_how = scores
    L, g = Layout(layout, key="BHDS" if key_cache == "transposed" else ""), _Graph(seed)
    emb = g.op("Gather", g.weight(VOCAB, HIDDEN), "input_ids", name="/model/embed_tokens/Gather")
    if L.projection == "SBHD":
        emb = g.op("Transpose", emb, perm=[1, 0, 2])
    rotary_dim = rotary_dim or (HEAD_DIM // 2 if rope == "partial" else HEAD_DIM)
    tables_layout = Layout(L.projection) if rope_at == "projection" else L
    interleaved = rope == "interleaved"
    cos, sin = _rope_tables(g, tables_layout, rotary_dim, interleaved, positions, emb)

    def rotate(g, x, cos, sin):
        if interleaved:
            turn = lambda g, x, cos, sin: _rotate_pairs(g, x, cos, sin, rotary_dim, flatten)  # noqa: E731
        else:
            turn = lambda g, x, cos, sin: _rotate(g, x, cos, sin, rotary_dim)  # noqa: E731
        if rotary_dim == HEAD_DIM:
            return turn(g, x, cos, sin)
        return _partial(g, x, cos, sin, rotary_dim, turn)

    def heads(width: int, n_heads: int, early: bool = False, rotary=True, order=L.name) -> str:
        """Projection → heads in `order` (L, or the key cache's), rotated on the way."""
        flat = g.op("MatMul", emb, g.weight(HIDDEN, width))
        proj = g.op("Reshape", flat, g.const([0, 0, n_heads, HEAD_DIM], np.int64))
        if qk_norm and rotary and qk_norm_at == "before":
            proj = _head_norm(g, proj, qk_norm)
        if early:
            proj = _repeat(g, Layout(L.projection), proj, n_heads)
        if rotary and rope_at == "projection":
            return _transpose(g, rotate(g, proj, cos, sin), L.perm(L.projection, order))
        cached = _transpose(g, proj, L.to_cache)
        cached = rotate(g, cached, cos, sin) if rotary else cached
        if qk_norm and rotary and qk_norm_at == "after":
            cached = _head_norm(g, cached, qk_norm)
        return _transpose(g, cached, L.perm(L.name, order))

    early_k, early_v = repeat in ("before_cache", "mixed"), repeat == "before_cache"
    q = heads(HEADS * HEAD_DIM, HEADS)
    k = heads(kv_heads * HEAD_DIM, kv_heads, early_k, order=L.key_order)
    v = heads(kv_heads * HEAD_DIM, kv_heads, early_v, rotary=False)
    # the pre-transposed key cache grows on its last axis, written -1 as its exporters do
    key_axis = -1 if L.key_order != L.name else L.seq_axis
    k_cat = g.op("Concat", "past_key_values.0.key", k, axis=key_axis)
    v_cat = g.op("Concat", "past_key_values.0.value", v, axis=L.seq_axis)
    g.nodes.append(helper.make_node("Identity", [k_cat], ["present.0.key"], "present_k"))
    g.nodes.append(helper.make_node("Identity", [v_cat], ["present.0.value"], "present_v"))
    cached = [HEADS if early else kv_heads for early in (early_k, early_v)]
    k_all = _repeat(g, Layout(L.key_order), "present.0.key", cached[0])
    v_all = _repeat(g, L, "present.0.value", cached[1])
    q_bhsd = _transpose(g, q, L.to_bhsd)
    key_t = _transpose(g, k_all, L.key_transposed)  # none for a key cached pre-transposed
    scores = _scaled_scores(g, q_bhsd, key_t, scale)
    scores = _modify_scores(g, L, scores, emb, modifier=scores_how)
    allowed = _causal_allowed(g, L, window=SLIDING_WINDOW if scores_how == "window" else None)
    if mask == "where":
        scores = g.op("Where", allowed, scores, g.const(-np.inf))
    else:
        additive = g.op("Where", allowed, g.const(0.0), g.const(-np.inf), name="/model/mask/W")
        scores = g.op("Add", scores, additive)
    probs = _softmax(g, scores, scores_how, q_bhsd)
    v_bhsd = _transpose(g, v_all, L.to_bhsd)
    attended = g.op("MatMul", probs, v_bhsd)
    merged = g.op("Transpose", attended, perm=L.bhsd_to_projection)
    flat = g.op("Reshape", merged, g.const([0, 0, HEADS * HEAD_DIM], np.int64))
    hidden = g.op("Add", emb, g.op("MatMul", flat, g.weight(HEADS * HEAD_DIM, HIDDEN)))
    if scores_how == "router":
        hidden = _routed(g, hidden)
    logits = g.op("MatMul", hidden, g.weight(HIDDEN, VOCAB))
    if L.projection == "SBHD":
        logits = g.op("Transpose", logits, perm=[1, 0, 2])
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], "logits"))
    return _model(g, L, *cached)


def _transpose(g: _Graph, x: str, perm: list[int]) -> str:
    return x if is_identity(perm) else g.op("Transpose", x, perm=perm)


def _rope_tables(
    g: _Graph, L: Layout, dims: int, interleaved: bool, positions: str, emb: str
) -> tuple[str, str]:
    """cos/sin [.., S, R] from the positions, shaped to broadcast against heads in layout L;
    each frequency appears twice: in two halves (rotate-half) or side by side (interleaved)."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dims, 2) / dims))
    per_dim = np.repeat(inv_freq, 2) if interleaved else np.concatenate([inv_freq, inv_freq])
    if positions == "shapes":
        ids = _positions_from_shapes(g, L, emb)
    else:
        ids = "position_ids"
    if positions == "table":
        angles_table = np.arange(512)[:, None] * per_dim[None, :]
        tables = [
            g.op("Gather", g.const(fn(angles_table)), ids, name=f"/model/rotary_emb/G{fn.__name__}")
            for fn in (np.cos, np.sin)
        ]
    else:
        cast = g.op("Cast", ids, to=TensorProto.FLOAT, name="/model/rotary_emb/Cast")
        unsqueezed = g.op(
            "Unsqueeze", cast, g.const([-1], np.int64), name="/model/rotary_emb/Unsqueeze"
        )
        angles = g.op("Mul", unsqueezed, g.const(per_dim), name="/model/rotary_emb/Mul")
        tables = [g.op(fn, angles, name=f"/model/rotary_emb/{fn}") for fn in ("Cos", "Sin")]
    shaped = []
    for fn, table in zip(("Cos", "Sin"), tables, strict=True):  # [B, S, R]
        if L.projection == "SBHD":
            table = g.op("Transpose", table, perm=[1, 0, 2], name=f"/model/rotary_emb/T{fn}")
        axis = L.head_axis  # insert a broadcast axis where the heads are
        shaped.append(g.op("Unsqueeze", table, g.const([axis], np.int64)))
    return shaped[0], shaped[1]


def _positions_from_shapes(g: _Graph, L: Layout, emb: str) -> str:
    """[1, S] positions past..past+S-1 from the past key's and the embeddings' shapes."""
    seq_axis = 0 if L.projection == "SBHD" else 1
    past = g.op(
        "Gather",
        g.op("Shape", "past_key_values.0.key", name="/model/pos/Shape"),
        g.const(L.key_seq_axis, np.int64),
        name="/model/pos/Gather",
    )
    new = g.op(
        "Gather",
        g.op("Shape", emb, name="/model/pos/Shape_1"),
        g.const(seq_axis, np.int64),
        name="/model/pos/Gather_1",
    )
    steps = g.op(
        "Range",
        past,
        g.op("Add", past, new, name="/model/pos/Add"),
        g.const(1, np.int64),
        name="/model/pos/Range",
    )
    return g.op("Unsqueeze", steps, g.const([0], np.int64), name="/model/pos/Unsqueeze")


def _head_norm(g: _Graph, x: str, kind: str) -> str:
    """Per-head RMSNorm (Qwen3's q_norm/k_norm) or LayerNorm over D of [.., H, D] heads."""
    weight = g.const(1.0 + 0.1 * g.rng.normal(size=HEAD_DIM))
    if kind == "layer":
        return g.op("LayerNormalization", x, weight, g.const(0.1 * g.rng.normal(size=HEAD_DIM)))
    mean = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.const([-1], np.int64))
    inverse = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.const(1e-6))))
    return g.op("Mul", g.op("Mul", x, inverse), weight)


def _rotate(g: _Graph, x: str, cos: str, sin: str, dims: int) -> str:
    half = dims // 2
    first = g.op(
        "Slice", x, g.const([0], np.int64), g.const([half], np.int64), g.const([-1], np.int64)
    )
    second = g.op(
        "Slice", x, g.const([half], np.int64), g.const([2**62], np.int64), g.const([-1], np.int64)
    )
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _rotate_pairs(g: _Graph, x: str, cos: str, sin: str, dims: int, flatten: str) -> str:
    """GPT-J's rotate_every_two: (x₀, x₁) → (−x₁, x₀) for each pair."""
    axes, step = g.const([-1], np.int64), g.const([2], np.int64)
    odd = g.op("Slice", x, g.const([1], np.int64), g.const([2**62], np.int64), axes, step)
    even = g.op("Slice", x, g.const([0], np.int64), g.const([2**62], np.int64), axes, step)
    stacked = g.op(
        "Concat", g.op("Unsqueeze", g.op("Neg", odd), axes), g.op("Unsqueeze", even, axes), axis=-1
    )
    if flatten == "shape":  # x.flatten(-2): Shape(stacked)[:-2] + [-1]
        kept = g.op(
            "Slice", g.op("Shape", stacked), g.const([0], np.int64), g.const([-2], np.int64)
        )
        target = g.op("Concat", kept, g.const([-1], np.int64), axis=0)
    else:
        target = g.const([0, 0, 0, dims], np.int64)
    rotated = g.op("Reshape", stacked, target)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _partial(g: _Graph, x: str, cos: str, sin: str, dims: int, turn) -> str:
    """RoPE (`turn`, either style) on the first `dims` of the head dim, the rest passed."""
    axes = g.const([-1], np.int64)
    head = g.op("Slice", x, g.const([0], np.int64), g.const([dims], np.int64), axes)
    tail = g.op("Slice", x, g.const([dims], np.int64), g.const([2**62], np.int64), axes)
    return g.op("Concat", turn(g, head, cos, sin), tail, axis=-1)


def _repeat(g: _Graph, L: Layout, x: str, kv_heads: int) -> str:
    if kv_heads == HEADS:
        return x
    axis = L.head_axis
    unsqueezed = g.op("Unsqueeze", x, g.const([axis + 1], np.int64))
    ones = [1] * 5
    ones[axis + 1] = HEADS // kv_heads
    expanded = g.op("Expand", unsqueezed, g.const(ones, np.int64))
    target = [0] * 4
    target[axis], target[L.name.index("D")] = HEADS, HEAD_DIM
    target[L.seq_axis] = -1
    return g.op("Reshape", expanded, g.const(target, np.int64))


def _scaled_scores(g: _Graph, q: str, key_t: str, scale: str) -> str:
    if scale == "split":
        root = g.const(HEAD_DIM**-0.25)
        return g.op("MatMul", g.op("Mul", q, root), g.op("Mul", key_t, root))
    if scale == "qk":
        return g.op("Mul", g.op("MatMul", q, key_t), g.const(HEAD_DIM**-0.5))
    return g.op("Div", g.op("MatMul", q, key_t), g.const(HEAD_DIM**0.5))


def _causal_allowed(g: _Graph, L: Layout, window: int | None = None) -> str:
    """True where key position t ≤ query position (and t > query − window); [B, 1, S, T]."""
    total = g.op(
        "Gather",
        g.op("Shape", "present.0.key"),
        g.const(L.key_seq_axis, np.int64),
        name="/model/mask/Gather",
    )
    key_pos = g.op(
        "Range", g.const(0, np.int64), total, g.const(1, np.int64), name="/model/mask/Range"
    )
    query_pos = g.op("Unsqueeze", "position_ids", g.const([-1], np.int64), name="/model/mask/Q")
    allowed = g.op("LessOrEqual", key_pos, query_pos, name="/model/mask/LessOrEqual")  # [B,S,T]
    if window is not None:
        oldest = g.op("Sub", query_pos, g.const(window, np.int64), name="/model/mask/Sub")
        recent = g.op("Greater", key_pos, oldest, name="/model/mask/Greater")
        allowed = g.op("And", allowed, recent, name="/model/mask/And")
    return g.op("Unsqueeze", allowed, g.const([1], np.int64), name="/model/mask/Unsqueeze")


def _model(g: _Graph, L: Layout, key_heads: int, value_heads: int) -> onnx.ModelProto:
    def cache_dims(kv: str, length: str) -> list:
        dims = {"B": "batch_size", "H": heads[kv], "S": length, "D": HEAD_DIM}
        return [dims[axis] for axis in (L.key_order if kv == "key" else L.name)]

    heads = {"key": key_heads, "value": value_heads}
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "seq"]),
    ] + [
        helper.make_tensor_value_info(
            f"past_key_values.0.{kv}", TensorProto.FLOAT, cache_dims(kv, "past_sequence_length")
        )
        for kv in heads
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "seq", VOCAB])
    ] + [
        helper.make_tensor_value_info(
            f"present.0.{kv}", TensorProto.FLOAT, cache_dims(kv, "total_sequence_length")
        )
        for kv in heads
    ]
    graph = helper.make_graph(g.nodes, f"synthetic_{L.name}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


# --- score modifiers (issue 11) -------------------------------------------------------------

SLIDING_WINDOW = 5  # shorter than the verification's 12 + 8 tokens
SOFTCAP = 5.0
# per-head ALiBi slopes 2^(-8h/H) and per-head sink logits
ALIBI_SLOPES = np.array([2.0 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)], np.float32)
SINKS = np.array([0.5, -1.0, 2.0, 0.0], np.float32)[:HEADS]
SCORE_MODIFIERS = {
    "plain": "nothing between Q·Kᵀ and the mask",
    "softcap": "c·tanh(s / c) (Gemma 2)",
    "softcap_mul": "c·tanh(s · 1/c) (a product instead of a division)",
    "softcap_mismatched": "negative: tanh(s / c) · c' with c' ≠ c",
    "alibi": "+ slope[h] · key position (MPT)",
    "bias_from_hidden": "negative: + a bias computed from the hidden state",
    "sinks": "a sink logit per head joins the softmax, sliced off after (GPT-OSS)",
    "sinks_stable": "sinks, and the joined scores minus their max before the softmax",
    "window": "a sliding-window causal mask (Mistral, Gemma 2's local layers)",
    "router": "an MoE router's Softmax → TopK beside the attention (no attention candidate)",
}


def _modify_scores(g: _Graph, L: Layout, scores: str, emb: str, modifier: str) -> str:
    if modifier in ("softcap", "softcap_mul", "softcap_mismatched"):
        inner = (
            g.op("Mul", scores, g.const(1.0 / SOFTCAP))
            if modifier == "softcap_mul"
            else g.op("Div", scores, g.const(SOFTCAP))
        )
        outer = SOFTCAP * (2 if modifier == "softcap_mismatched" else 1)
        return g.op("Mul", g.op("Tanh", inner), g.const(outer))
    if modifier == "alibi":
        total = g.op("Gather", g.op("Shape", "present.0.key"), g.const(L.key_seq_axis, np.int64))
        keys = g.op("Range", g.const(0, np.int64), total, g.const(1, np.int64))
        keys = g.op("Cast", keys, to=TensorProto.FLOAT)  # [T]
        return g.op("Add", scores, g.op("Mul", g.const(ALIBI_SLOPES.reshape(1, HEADS, 1, 1)), keys))
    if modifier == "bias_from_hidden":  # [B, 1, S, 1]: one value per query row, from activations
        per_row = g.op("ReduceSum", emb, g.const([-1], np.int64), keepdims=1)
        if L.projection == "SBHD":
            per_row = g.op("Transpose", per_row, perm=[1, 0, 2])
        return g.op("Add", scores, g.op("Unsqueeze", per_row, g.const([1], np.int64)))
    return scores


def _softmax(g: _Graph, scores: str, modifier: str, query: str) -> str:
    if not modifier.startswith("sinks"):
        return g.op("Softmax", scores, axis=-1)
    # sinks [1, H, 1, 1] broadcast to [B, H, S, 1] through the query's shape, as GPT-OSS does
    shape = g.op("Shape", query)
    rows = g.op(
        "Concat",
        g.op("Slice", shape, g.const([0], np.int64), g.const([3], np.int64)),
        g.const([1], np.int64),
        axis=0,
    )
    sink = g.op("Expand", g.const(SINKS.reshape(1, HEADS, 1, 1)), rows)
    joined = g.op("Concat", scores, sink, axis=-1)
    if modifier == "sinks_stable":
        peak = g.op("ReduceMax", joined, g.const([-1], np.int64), keepdims=1)
        joined = g.op("Sub", joined, peak)
    probs = g.op("Softmax", joined, axis=-1)
    axes = g.const([-1], np.int64)
    return g.op("Slice", probs, g.const([0], np.int64), g.const([-1], np.int64), axes)


def _routed(g: _Graph, hidden: str) -> str:
    """hidden · (sum of the router's top-2 probabilities): a Softmax that is not attention."""
    router = g.op(
        "Softmax",
        g.op("MatMul", hidden, g.weight(HIDDEN, 4)),
        axis=-1,
        name="/model/layers.0/mlp/router/Softmax",
    )
    top = "router_top_values"
    g.nodes.append(
        helper.make_node(
            "TopK", [router, g.const([2], np.int64)], [top, "router_top_indices"], "router_topk"
        )
    )
    weight = g.op("ReduceSum", top, g.const([-1], np.int64), keepdims=1)
    return g.op("Mul", hidden, weight)
