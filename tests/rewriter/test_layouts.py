"""The attention rules on hand-built graphs in every layout, scale placement and head repeat."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kvfuse.exporters.reference import ConcatCacheRunner
from kvfuse.optimize import PartialFusion, optimize
from kvfuse.rewriter.layout import KEY_PRETRANSPOSED, LAYOUTS, Layout
from tests.rewriter.synthetic import build_lm


def run(tmp_path, model: onnx.ModelProto, **kwargs):
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    return optimize(source, tmp_path / "out.onnx", max_context=32, quiet=True, **kwargs)


@pytest.mark.parametrize("layout", [layout.name for layout in LAYOUTS])
@pytest.mark.parametrize("scale", ["split", "qk", "div"])
def test_layout_fuses_and_verifies(tmp_path, layout, scale):
    """Each layout × scale placement: every rule fires once per use and outputs agree."""
    result = run(tmp_path, build_lm(layout, scale=scale))
    counts = result.rule_counts
    suffix = layout.lower()
    assert counts[f"attention/sdpa_{suffix}"] == 1
    assert counts[f"attention/cached_{suffix}_rope"] == 1
    assert counts["rotary/half"] == 2  # q and k
    assert counts["attention/repeat_kv"] == 2  # k and v: 4 heads over 2 kv heads
    assert result.ops_after["GroupQueryAttention"] == 1
    assert not {"Softmax", "Concat", "Cos", "Sin", "Range"} & set(result.ops_after)
    assert result.verification.passed, result.verification.summary()
    assert result.verification.max_abs_diff < 1e-5


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("rope", ["interleaved", "partial"])
def test_rope_styles_fuse_into_gqa_rotary(tmp_path, layout, rope):
    """Interleaved and partial RoPE fuse; GQA gets rotary_interleaved and an R/2-wide cache."""
    result = run(tmp_path, build_lm(layout, rope=rope, head_dim=32))
    assert result.rule_counts[f"rotary/{rope}"] == 2
    assert result.ops_after["GroupQueryAttention"] == 1
    model = onnx.load(result.output)
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attributes["do_rotary"] == 1
    assert attributes["rotary_interleaved"] == (rope == "interleaved")
    cos = next(i for i in model.graph.initializer if i.name == gqa.input[7])
    assert list(cos.dims) == [32, 8 if rope == "partial" else 16]
    assert result.verification.passed, result.verification.summary()


@pytest.mark.parametrize("layout", ["BHSD", "SBHD"])
def test_where_mask_fuses(tmp_path, layout):
    """A boolean mask applied with Where(allowed, scores, -inf) fuses like an additive one."""
    result = run(tmp_path, build_lm(layout, mask="where"))
    assert result.rule_counts[f"attention/sdpa_{layout.lower()}"] == 1
    assert result.ops_after["GroupQueryAttention"] == 1
    assert result.verification.passed


def _with_harmless_fill(model):
    """The scores' Where fills with 0.0 instead of −inf: it masks nothing out."""
    where = next(n for n in model.graph.node if n.op_type == "Where" and "mask" not in n.name)
    fill = next(i for i in model.graph.initializer if i.name == where.input[2])
    fill.CopyFrom(onnx.numpy_helper.from_array(np.array(0.0, np.float32), fill.name))
    return model


def test_where_mask_with_a_harmless_fill_is_not_a_mask(tmp_path):
    """Where(allowed, scores, 0.0) does not mask anything out: refused, with the reason."""
    model = _with_harmless_fill(build_lm("BHSD", mask="where"))
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, model)
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("does not mask out" in reason for reason in reasons), reasons


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_mha_and_mqa_are_gqa_with_other_kv_head_counts(tmp_path, kv_heads):
    """MHA (no repeat) and MQA (one kv head) lower to GQA with kv_num_heads 4 and 1."""
    result = run(tmp_path, build_lm("BHSD", kv_heads=kv_heads))
    assert result.rule_counts["attention/repeat_kv"] == (0 if kv_heads == 4 else 2)
    gqa = next(n for n in onnx.load(result.output).graph.node if n.op_type == "GroupQueryAttention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert (attributes["num_heads"], attributes["kv_num_heads"]) == (4, kv_heads)
    assert result.verification.passed


def test_rewritten_model_runs_with_onnxruntime_optimisations_on(tmp_path):
    """The output is a valid model for a normal (optimising) onnxruntime session too."""
    result = run(tmp_path, build_lm("SBHD"))
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    assert names == {
        "input_ids",
        "seqlens_k",
        "total_sequence_length",
        "past_key_values.0.key",
        "past_key_values.0.value",
    }


def _node(model: onnx.ModelProto, op_type: str, index: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == op_type][index]


def test_no_fusion_when_an_intermediate_is_used_elsewhere(tmp_path):
    """Attention probabilities exported as an extra output must keep the decomposed graph."""
    model = build_lm("BHSD")
    probs = _node(model, "Softmax").output[0]
    dims = ["batch_size", 4, "seq", "total_sequence_length"]  # the input checks need a shape
    model.graph.output.append(onnx.helper.make_tensor_value_info(probs, 1, dims))
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, model)
    layer = failure.value.result.layers[0]
    assert not layer.fused
    assert any("other uses" in miss.reason for miss in layer.near_misses), layer.near_misses
    assert not (tmp_path / "out.onnx").exists()


def test_no_fusion_with_a_wrong_key_permutation(tmp_path):
    """A key transposed with the wrong perm is not attention: the reason names the perm."""
    model = build_lm("BHSD")
    key_transpose = next(
        n
        for n in model.graph.node
        if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 1, 3, 2]
    )
    key_transpose.attribute[0].ints[:] = [1, 0, 3, 2]  # no layout transposes a key like this
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, model)
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("perm" in reason for reason in reasons), reasons
    assert "attention layers fused" in str(failure.value)


def test_no_fusion_with_mismatched_head_dims(tmp_path):
    """A value head dim unlike the key's is refused with both dims in the reason."""
    model = build_lm("BHSD")
    value_input = next(i for i in model.graph.input if i.name == "past_key_values.0.value")
    value_input.type.tensor_type.shape.dim[3].dim_value = 8
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, model)
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("head dim" in reason for reason in reasons), reasons


def _logits(model: onnx.ModelProto, steps: list[np.ndarray]) -> list[np.ndarray]:
    """Prefill with the first ids, decode the rest, feeding the Concat cache back."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = ConcatCacheRunner(None, session=session)
    return [runner.prefill(steps[0])] + [runner.step(ids) for ids in steps[1:]]


@pytest.mark.parametrize("rope_at", ["cache", "projection"])
def test_pretransposed_key_model_computes_what_the_usual_layout_does(rope_at):
    """The synthetic K-as-Kᵀ model (same seed) gives the usual BHSD model's logits, and its
    present key is the usual one transposed: it is the same computation, cached otherwise."""
    steps = [np.array([[5, 9, 3, 17, 2]]), np.array([[11]]), np.array([[40]])]
    usual = build_lm("BHSD", seed=3)
    transposed = build_lm("BHSD", seed=3, key_cache="transposed", rope_at=rope_at)
    for expected, found in zip(_logits(usual, steps), _logits(transposed, steps), strict=True):
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)
    key_input = next(i for i in transposed.graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_param or d.dim_value for d in key_input.type.tensor_type.shape.dim]
    assert dims == ["batch_size", 2, 16, "past_sequence_length"]


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("rope_at", ["cache", "projection"])
def test_pretransposed_key_fuses_into_bhsd_buffers(tmp_path, target, kv_heads, rope_at):
    """K cached as [B, Hkv, D, T] (concat on axis -1, Q·K with no transpose) fuses for both
    targets; the optimized model keeps the usual [B, Hkv, max_context, D] key buffer and
    verifies against the original."""
    model = build_lm("BHSD", kv_heads=kv_heads, key_cache="transposed", rope_at=rope_at)
    result = run(tmp_path, model, target=target)
    counts = result.rule_counts
    assert counts["attention/sdpa_bhsd_k_bhds"] == 1
    assert counts["attention/cached_bhsd_k_bhds_rope"] == 1
    assert counts["attention/repeat_kv"] == (0 if kv_heads == 4 else 2)
    fused = {"ort": {"GroupQueryAttention"}, "onnx": {"TensorScatter", "Attention"}}[target]
    assert fused <= set(result.ops_after)
    assert not {"Softmax", "Concat"} & set(result.ops_after)  # no growing cache left
    written = {v.name: v for v in onnx.load(result.output).graph.input}
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        dims = [d.dim_value for d in written[name].type.tensor_type.shape.dim]
        assert dims[1:] == [kv_heads, 32, 16], (name, dims)
    verification = result.verification
    assert verification.passed, verification.summary()
    assert verification.max_abs_diff < 1e-4 and verification.tokens_equal


def _read_key_transposed_back(model: onnx.ModelProto) -> onnx.ModelProto:
    """Insert Transpose(0, 1, 3, 2) between the [B, H, D, T] key and Q·K: Q then meets a
    [B, H, T, D] key, contracting D with T — not attention over that cache."""
    scores = next(n for n in model.graph.node if n.op_type == "MatMul" and "mul" in n.input[1])
    key_scale = next(n for n in model.graph.node if n.output[0] == scores.input[1])
    read = onnx.helper.make_node(
        "Transpose", [key_scale.input[0]], ["key_BHTD"], "/model/layers.0/K", perm=[0, 1, 3, 2]
    )
    key_scale.input[0] = "key_BHTD"
    model.graph.node.insert(list(model.graph.node).index(key_scale), read)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_pretransposed_key_read_through_a_transpose_is_not_fused(tmp_path, kv_heads):
    """A key cache grown on its last axis but transposed again before Q·K is refused; the
    tracer's best near miss names the key order attention reads and the one expected."""
    model = build_lm("BHSD", kv_heads=kv_heads, key_cache="transposed")
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, _read_key_transposed_back(model))
    misses = failure.value.result.layers[0].near_misses
    best = next(m for m in misses if m.rule == "attention/cached_bhsd_k_bhds_rope")
    assert best.reason == (
        "attention reads the key cache as BHSD (key transpose before Q·Kᵀ: Transpose "
        "[0, 1, 3, 2]), expected BHDS"
    )
    assert not (tmp_path / "out.onnx").exists()


def test_pretransposed_key_near_miss_names_the_real_failure(tmp_path):
    """A K-as-Kᵀ model with a mask that masks nothing: the diagnosis accepts the untransposed
    [B, H, D, T] key and the reason given is the mask, not a missing key transpose."""
    model = _with_harmless_fill(build_lm("BHSD", mask="where", key_cache="transposed"))
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, model)
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("does not mask out" in reason for reason in reasons), reasons
    assert not any("Transpose of K" in reason for reason in reasons), reasons


def test_layout_permutations():
    """Layout derives each perm from its letters."""
    assert Layout("BHSD").key_transposed == [0, 1, 3, 2]
    assert Layout("BSHD").key_transposed == [0, 2, 3, 1]
    assert Layout("SBHD").key_transposed == [1, 2, 3, 0]
    assert Layout("BHSD").to_cache == [0, 2, 1, 3] and Layout("BSHD").to_cache == [0, 1, 2, 3]
    assert [layout.seq_axis for layout in LAYOUTS] == [2, 1, 0]
    assert KEY_PRETRANSPOSED.key_transposed == [0, 1, 2, 3]  # Q·K reads the cache as it is
    assert KEY_PRETRANSPOSED.to_key_cache == [0, 2, 3, 1] and KEY_PRETRANSPOSED.key_seq_axis == 3
    assert KEY_PRETRANSPOSED.cache_to_key == [0, 1, 3, 2]
    assert KEY_PRETRANSPOSED.label == "bhsd_k_bhds" and Layout("BSHD").label == "bshd"
    with pytest.raises(ValueError, match="permutation of BHSD"):
        Layout("BHS")
