"""Golden and negative tests of `layout/heads_from_batch(_v)`: Bloom's attention with the heads
folded into the batch ([B·H, S, T] scores = alibi + α·Q·Kᵀ, then P·V over [B·H, …]) unfolded
to [B, H, …] products that `attention/sdpa_bhsd` fuses; merges of other axes left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kvfuse.patterns.attention import batched_heads, diagnose, sdpa
from kvfuse.rewriter import shapes
from kvfuse.rewriter.rules import KVFUSE_DOMAIN, RULE_TAG, apply_rules, trace_rules

HEADS, NEW, TOTAL, HEAD_DIM = 4, 5, 7, 8
SLOPES = [2.0 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)]
# the core rule of the [B, H, S, D] layout (its commuted variants are many: the others are
# not needed here)
SDPA_BHSD = [rule for rule in sdpa.RULES if rule.name == "attention/sdpa_bhsd"]

# B·H as the exporters write it: Optimum `batch_size * num_heads` from Gather(Shape(q), 0);
# the dynamo exporter the same product from another tensor's Shape(·)[0:1], squeezed
MERGED_BATCH = {
    "optimum": """
    zero = Constant<value = int64 {0}>()
    q_dims = Shape(q)
    batch_scalar = Gather(q_dims, zero)
    heads_scalar = Constant<value = int64 {4}>()
    axes0 = Constant<value = int64[1] {0}>()
    bh_scalar = Mul(batch_scalar, heads_scalar)
    bh = Unsqueeze(bh_scalar, axes0)
""",
    "dynamo": """
    v_batch = Shape<start = 0, end = 1>(v)
    batch_scalar = Squeeze(v_batch)
    heads_scalar = Constant<value = int64 {4}>()
    flat = Constant<value = int64[1] {-1}>()
    bh_scalar = Mul(batch_scalar, heads_scalar)
    bh = Reshape(bh_scalar, flat)
""",
    # negative: S·H (the query's axis 2 times H), equal to B·H only when B = S
    "rows": """
    two = Constant<value = int64 {2}>()
    q_dims = Shape(q)
    rows_scalar = Gather(q_dims, two)
    heads_scalar = Constant<value = int64 {4}>()
    axes0 = Constant<value = int64[1] {0}>()
    bh_scalar = Mul(rows_scalar, heads_scalar)
    bh = Unsqueeze(bh_scalar, axes0)
""",
}

# Bloom's attention for one layer: ALiBi [B·H, 1, T] from the attention mask's cumulative
# positions, baddbmm(alibi, q, kᵀ, β=1, α) over [B·H, …], the mask and softmax over
# [B, H, S, T], then bmm(probs, v) over [B·H, …] split back to [B, H, S, D]
GRAPH = """
<ir_version: 10, opset_import: ["" : 18]>
bloom (float[batch, 4, 5, 8] q, float[batch, 4, 7, 8] k, float[batch, 4, 7, 8] v,
       int64[batch, 7] attention_mask, float[batch, 1, 5, 7] mask) => (float[batch, 4, 5, 8] out) {
    MERGED_BATCH
    b = Shape<start = 0, end = 1>(q)
    h = Constant<value = int64[1] {4}>()
    s = Constant<value = int64[1] {5}>()
    t = Constant<value = int64[1] {7}>()
    d = Constant<value = int64[1] {8}>()
    one = Constant<value = int64[1] {1}>()
    axis1 = Constant<value = int64 {1}>()
    counted = CumSum(attention_mask, axis1)
    from_zero = Sub(counted, one)
    kept = Mul(from_zero, attention_mask)
    positions = Cast<to = 1>(kept)
    slopes = Constant<value = float[1, 4, 1] {SLOPES}>()
    positions3 = Unsqueeze(positions, one)
    alibi_heads = Mul(slopes, positions3)
    alibi_shape = Constant<value = int64[3] {-1, 1, 7}>()
    alibi = Reshape(alibi_heads, alibi_shape)
    q_shape = Concat<axis = 0>(bh, s, d)
    kv_shape = Concat<axis = 0>(bh, t, d)
    q3 = Reshape(q, q_shape)
    k3 = Reshape(k, kv_shape)
    k3t = Transpose<perm = [0, 2, 1]>(k3)
    qk = MatMul(q3, k3t)
    alpha = Constant<value = float {0.35355339}>()
    qk_scaled = Mul(qk, alpha)
    baddbmm = Add(qk_scaled, alibi)
    split_shape = Concat<axis = 0>(b, h, s, t)
    scores = Reshape(baddbmm, split_shape)
    masked = Add(scores, mask)
    probs = Softmax<axis = -1>(masked)
    p_shape = Concat<axis = 0>(bh, s, t)
    p3 = Reshape(probs, p_shape)
    v3 = Reshape(v, kv_shape)
    pv = MatMul(p3, v3)
    out_shape = Concat<axis = 0>(b, h, s, d)
    out = Reshape(pv, out_shape)
}
"""


def _load(text: str) -> ir.Model:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    shapes.resolve_shapes(model)  # the optimizer's clean-up: data-propagated shapes
    return model


def _bloom(exporter: str) -> ir.Model:
    text = GRAPH.replace("MERGED_BATCH", MERGED_BATCH[exporter])
    return _load(text.replace("SLOPES", ", ".join(f"{x!r}" for x in SLOPES)))


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    attention_mask = np.ones((batch, TOTAL), np.int64)
    attention_mask[0, :2] = 0  # a left-padded row: ALiBi positions start after the padding
    causal = np.triu(np.full((NEW, TOTAL), -1e9, np.float32), k=TOTAL - NEW + 1)
    return {
        "q": rng.normal(size=(batch, HEADS, NEW, HEAD_DIM)).astype(np.float32),
        "k": rng.normal(size=(batch, HEADS, TOTAL, HEAD_DIM)).astype(np.float32),
        "v": rng.normal(size=(batch, HEADS, TOTAL, HEAD_DIM)).astype(np.float32),
        "attention_mask": attention_mask,
        "mask": np.broadcast_to(causal, (batch, 1, NEW, TOTAL)).copy(),
    }


def _matmul_ranks(model: ir.Model) -> list[int]:
    return sorted(len(n.inputs[0].shape) for n in model.graph if n.op_type == "MatMul")


@pytest.mark.parametrize("exporter", ["optimum", "dynamo"])
def test_batched_heads_unfold_to_per_head_products(exporter):
    """Both rules fire once; only [B, H, …] MatMuls are left (the merged chains are gone), the
    bias is split back per head, and the outputs equal the original's for batch 2 and 3."""
    model = _bloom(exporter)
    before = {batch: _run(model, _feeds(batch)) for batch in (2, 3)}
    assert _matmul_ranks(model) == [3, 3]
    counts = batched_heads.unfold_heads(model)
    assert counts == {"layout/heads_from_batch": 1, "layout/heads_from_batch_v": 1}
    assert _matmul_ranks(model) == [4, 4]
    tags = {n.metadata_props.get(RULE_TAG) for n in model.graph if n.op_type == "MatMul"}
    assert tags == {"layout/heads_from_batch", "layout/heads_from_batch_v"}
    for batch, expected in before.items():
        found = _run(model, _feeds(batch))
        np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6)
    # the per-head ALiBi, not a copy of the batched one, reaches the 4-D scores
    assert "Reshape" in {n.op_type for n in model.graph if n.op_type != "Constant"}


def test_unfolded_attention_fuses_with_its_alibi_bias():
    """After the unfold, `attention/sdpa_bhsd` fuses the whole layer: one kvfuse Attention
    with the scale α, the mask and the ALiBi bias as its position-bias input; no Softmax left."""
    model = _bloom("dynamo")
    batched_heads.unfold_heads(model)
    assert apply_rules(model, SDPA_BHSD)["attention/sdpa_bhsd"] == 1
    (fused,) = [n for n in model.graph if n.domain == KVFUSE_DOMAIN]
    assert fused.op_type == "Attention"
    assert fused.attributes.get_float("scale") == pytest.approx(0.35355339)
    assert len(fused.inputs) == 5 and fused.inputs[4] is not None  # the position bias
    assert "Softmax" not in {n.op_type for n in model.graph}


def test_batched_form_without_the_unfold_does_not_fuse():
    """The core rule alone does not match the [B·H, S, T] form (why the unfold exists)."""
    model = _bloom("optimum")
    assert apply_rules(model, SDPA_BHSD)["attention/sdpa_bhsd"] == 0


def test_a_merge_sized_by_another_axis_is_not_unfolded_and_the_diagnosis_says_why():
    """B·H taken as S·H (right only when B = S): neither rule fires, and the Softmax's
    diagnosis names the merge that stopped it, not a bare pattern mismatch."""
    model = _bloom("rows")
    assert batched_heads.unfold_heads(model) == {
        "layout/heads_from_batch": 0,
        "layout/heads_from_batch_v": 0,
    }
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    reason = diagnose.diagnose_softmax(softmax).reason
    expected = "layout/heads_from_batch did not unfold: q ['batch', 4, 5, 8] merged to [20, 5, 8]"
    assert expected in reason, reason
    assert "expected [B, H] = ['batch', 4] joined" in reason


def test_values_left_batched_are_diagnosed_after_the_scores_unfold():
    """Scores unfolded, P·V not (V merged by S·H): the diagnosis names the V merge."""
    model = _bloom("optimum")
    (v_merge,) = [n for n in model.graph if n.op_type == "Reshape" and n.inputs[0].name == "v"]
    rows = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([20, 7, 8]))})
    model.graph.insert_before(v_merge, rows)
    v_merge.replace_input_with(1, rows.outputs[0])
    shapes.resolve_shapes(model)
    counts = batched_heads.unfold_heads(model)
    assert counts == {"layout/heads_from_batch": 1, "layout/heads_from_batch_v": 0}
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    reason = diagnose.diagnose_softmax(softmax).reason
    expected = "layout/heads_from_batch_v did not unfold: v ['batch', 4, 7, 8] merged to [20, 7, 8]"
    assert expected in reason, reason


# the scores chain alone, with the merging reshapes written as NEGATIVE cases make them
SCORES = """
<ir_version: 10, opset_import: ["" : 18]>
scores (float[batch, 4, 5, 8] q, float[batch, 4, 7, 8] k) => (float[batch, 4, ROWS, COLS] y) {
    b = Shape<start = 0, end = 1>(q)
    zero = Constant<value = int64 {0}>()
    heads_scalar = Constant<value = int64 {4}>()
    axes0 = Constant<value = int64[1] {0}>()
    q_dims = Shape(q)
    batch_scalar = Gather(q_dims, zero)
    bh_scalar = Mul(batch_scalar, heads_scalar)
    bh = Unsqueeze(bh_scalar, axes0)
    h = Constant<value = int64[1] {4}>()
    q_shape = Concat<axis = 0>(Q_SHAPE)
    k_shape = Concat<axis = 0>(K_SHAPE)
    q3 = Reshape(q, q_shape)
    k3 = Reshape(k, k_shape)
    k3t = Transpose<perm = [0, 2, 1]>(k3)
    qk = MatMul(q3, k3t)
    split_shape = Concat<axis = 0>(b, h, SPLIT)
    y = Reshape(qk, split_shape)
}
"""


def _scores(q_shape: str, k_shape: str, split: list[int]) -> ir.Model:
    lines = [
        f"    c{n} = Constant<value = int64[1] {{{n}}}>()" for n in (5, 7, 8, 4, 10, 14, 20, 28)
    ]
    text = SCORES.replace("Q_SHAPE", q_shape).replace("K_SHAPE", k_shape)
    text = text.replace("SPLIT", ", ".join(f"c{n}" for n in split))
    text = text.replace("ROWS", str(split[0])).replace("COLS", str(split[1]))
    return _load(text.replace("    b = Shape", "\n".join(lines) + "\n    b = Shape", 1))


def _reasons(model: ir.Model, rule: str) -> list[str]:
    tracer = trace_rules(model, batched_heads.RULES)
    return [miss.reason for (name, _), miss in tracer.attempts.items() if name == rule]


def test_a_merge_of_heads_and_rows_is_not_unfolded():
    """Reshape [B, H, S, D] → [B, H·S, D] (and K alike) multiplies every head's rows by every
    head's keys: a different computation, left as it is, and the reason names the merge."""
    model = _scores("b, c20, c8", "b, c28, c8", [5, 28])
    reasons = _reasons(model, "layout/heads_from_batch")
    assert batched_heads.unfold_heads(model) == {
        "layout/heads_from_batch": 0,
        "layout/heads_from_batch_v": 0,
    }
    assert _matmul_ranks(model) == [3]
    assert any(
        "merged to ['batch', 20, 8], expected [B, H] = ['batch', 4] joined" in r for r in reasons
    ), reasons


def test_a_merge_that_reshapes_the_last_two_axes_is_not_unfolded():
    """[B, H, S, D] → [B·H, 2S, D/2]: B and H are joined but the rows and head dim are cut
    differently, so Q·Kᵀ is no per-head product; refused with that reason."""
    model = _scores("bh, c10, c4", "bh, c14, c4", [10, 14])
    reasons = _reasons(model, "layout/heads_from_batch")
    assert batched_heads.unfold_heads(model)["layout/heads_from_batch"] == 0
    assert any("its last axis is not kept" in r for r in reasons), reasons


VALUES = """
<ir_version: 10, opset_import: ["" : 18]>
values (float[batch, 4, 5, 14] probs, float[batch, 4, 7, 8] v) => (float[batch, 4, 5, 4] y) {
    b = Shape<start = 0, end = 1>(v)
    zero = Constant<value = int64 {0}>()
    heads_scalar = Constant<value = int64 {4}>()
    axes0 = Constant<value = int64[1] {0}>()
    v_dims = Shape(v)
    batch_scalar = Gather(v_dims, zero)
    bh_scalar = Mul(batch_scalar, heads_scalar)
    bh = Unsqueeze(bh_scalar, axes0)
    p_rest = Constant<value = int64[2] {5, 14}>()
    v_rest = Constant<value = int64[2] {14, 4}>()
    y_rest = Constant<value = int64[3] {4, 5, 4}>()
    p_shape = Concat<axis = 0>(bh, p_rest)
    v_shape = Concat<axis = 0>(bh, v_rest)
    y_shape = Concat<axis = 0>(b, y_rest)
    p3 = Reshape(probs, p_shape)
    v3 = Reshape(v, v_shape)
    pv = MatMul(p3, v3)
    y = Reshape(pv, y_shape)
}
"""


def test_values_reshaped_across_their_head_dim_are_not_unfolded():
    """V [B, H, T, D] merged to [B·H, 2T, D/2] is no per-head P·V: no rewrite, and why."""
    model = _load(VALUES)
    reasons = _reasons(model, "layout/heads_from_batch_v")
    assert batched_heads.unfold_heads(model)["layout/heads_from_batch_v"] == 0
    assert any(
        "v ['batch', 4, 7, 8] merged to" in r and "last axis is not kept" in r for r in reasons
    ), reasons
