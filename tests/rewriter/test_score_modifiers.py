"""Score modifiers on hand-built graphs: soft-capping, ALiBi, attention sinks, a sliding-window
mask read per layer, and an MoE router's softmax that is no attention candidate — fused, lowered
for both targets, verified; and the near misses that must not fuse, with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from kvfuse.optimize import PartialFusion, optimize
from tests.rewriter.synthetic import ALIBI_SLOPES, SINKS, SLIDING_WINDOW, SOFTCAP, build_lm


def run(tmp_path, model: onnx.ModelProto, **kwargs):
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    return optimize(source, tmp_path / "out.onnx", max_context=32, quiet=True, **kwargs)


def _gqa(result) -> onnx.NodeProto:
    model = onnx.load(result.output)
    return next(n for n in model.graph.node if n.op_type == "GroupQueryAttention"), model


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return onnx.numpy_helper.to_array(tensor)


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("how", ["softcap", "softcap_mul"])
def test_soft_capping_lowers_to_gqa_softcap(tmp_path, layout, how):
    """c·tanh(s/c) (or s·1/c) between Q·Kᵀ and the mask → GQA softcap = c; verified."""
    result = run(tmp_path, build_lm(layout, scores=how))
    gqa, _ = _gqa(result)
    assert _attributes(gqa)["softcap"] == pytest.approx(SOFTCAP)
    assert "Tanh" not in result.ops_after
    assert result.layers[0].lowering == "gqa-rotary"
    assert "softcap" in result.layers[0].lowering_reason
    assert result.verification.passed, result.verification.summary()


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_alibi_slopes_become_gqa_attention_bias(tmp_path, layout):
    """A per-head slope · key position added to the scores: the slopes are recovered from the
    graph's own builder, rebuilt as GQA's attention_bias; verified against the original."""
    result = run(tmp_path, build_lm(layout, scores="alibi"))
    gqa, model = _gqa(result)
    assert len(gqa.input) >= 11 and gqa.input[10]  # attention_bias
    constants = [onnx.numpy_helper.to_array(t).reshape(-1) for t in model.graph.initializer]
    constants += [
        onnx.numpy_helper.to_array(n.attribute[0].t).reshape(-1)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute[0].type == onnx.AttributeProto.TENSOR
    ]
    assert any(  # the recovered slopes, as a [1, H, 1, 1] constant after folding
        c.shape == ALIBI_SLOPES.shape and np.allclose(c, ALIBI_SLOPES, rtol=1e-5) for c in constants
    )
    assert "ALiBi" in result.layers[0].lowering_reason
    assert result.verification.passed, result.verification.summary()


@pytest.mark.parametrize("how", ["sinks", "sinks_stable"])
def test_attention_sinks_become_gqa_head_sink(tmp_path, how):
    """A sink logit per head joined to the softmax (with or without the max subtraction) and
    sliced off after → GQA head_sink holding those logits; verified."""
    result = run(tmp_path, build_lm("BHSD", scores=how))
    gqa, model = _gqa(result)
    assert len(gqa.input) == 12 and gqa.input[11]
    np.testing.assert_allclose(_initializer(model, gqa.input[11]), SINKS)
    assert not {"Softmax", "ReduceMax"} & set(result.ops_after)
    assert result.verification.passed, result.verification.summary()


@pytest.mark.parametrize("how", ["softcap", "alibi", "sinks", "window"])
def test_modifiers_lower_to_standard_attention_over_the_fixed_buffer(tmp_path, how):
    """Target onnx: softcap as Attention's softcap, ALiBi in a float position mask, sinks as
    one zero key masked with the sink logit, the window in the mask; verified."""
    result = run(tmp_path, build_lm("BHSD", scores=how), target="onnx")
    assert result.layers[0].lowering == "rotary-op+attention"
    model = onnx.load(result.output)
    assert {n.domain for n in model.graph.node} <= {""}
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    assert (_attributes(attention).get("softcap", 0.0) > 0) == (how == "softcap")
    assert result.verification.passed, result.verification.summary()


def test_sliding_window_is_read_from_the_layer_mask(tmp_path):
    """No export metadata: the window comes from the layer's own mask (keys t > p − W)."""
    result = run(tmp_path, build_lm("BHSD", scores="window"))
    gqa, _ = _gqa(result)
    assert _attributes(gqa)["local_window_size"] == SLIDING_WINDOW
    assert f"sliding window {SLIDING_WINDOW}" in result.layers[0].lowering_reason
    assert result.verification.passed, result.verification.summary()


def test_plain_layer_records_its_lowering(tmp_path):
    """A layer with no score modifier: the reason names only what the kernel fuses."""
    result = run(tmp_path, build_lm("BHSD"))
    layer = result.layers[0]
    assert (layer.lowering, layer.fused) == ("gqa-rotary", True)
    assert layer.lowering_reason == "RoPE fused into GroupQueryAttention (do_rotary)"


def test_router_softmax_is_not_an_attention_candidate(tmp_path):
    """An MoE router's Softmax → TopK beside the attention: one candidate, fused (not "1 of
    2 layers"); the router stays as it was."""
    result = run(tmp_path, build_lm("BHSD", scores="router"))
    assert len(result.layers) == 1 and result.fused_layers == 1
    assert result.ops_after["Softmax"] == 1 and result.ops_after["TopK"] == 1
    assert result.verification.passed, result.verification.summary()


def test_mismatched_soft_capping_is_not_fused(tmp_path):
    """tanh(s / c) · c' with c' ≠ c is no soft-capping: refused with that reason."""
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, build_lm("BHSD", scores="softcap_mismatched"))
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("divides and multiplies by different constants" in r for r in reasons), reasons
    assert not (tmp_path / "out.onnx").exists()


def test_bias_computed_from_activations_is_not_a_position_bias(tmp_path):
    """A bias on the scores computed from the hidden state is no ALiBi: refused, naming it."""
    with pytest.raises(PartialFusion) as failure:
        run(tmp_path, build_lm("BHSD", scores="bias_from_hidden"))
    reasons = [m.reason for m in failure.value.result.layers[0].near_misses]
    assert any("reads input_ids (expected only positions and shapes)" in r for r in reasons)
